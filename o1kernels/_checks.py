"""Argument checks shared by the public ops.

Every public op validates its inputs with these helpers before any kernel runs,
so bad input raises a TypeError/ValueError naming the argument, the expected and
the actual shape, dtype or device.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1  # largest size or index the int32-indexed kernels take


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that `t` is a tensor with `ndim` dims, one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of the other inputs), got {t.device}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Check `t.shape` against `expected`, where None matches any size."""
    shape = tuple(t.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        exp = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {exp}, got {list(shape)}")


def check_count(name: str, value, *, minimum: int = 0) -> int:
    """`value` as a count/size: an int (not a bool) in [minimum, 2**31 - 1], else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT32_MAX:
        raise ValueError(f"{name} must be an int in [{minimum}, 2**31 - 1], got {value!r}")
    return value


def check_fits_int32(name: str, value: int, what: str, why: str = "") -> None:
    """ValueError naming `name` when `value` (a size or index) exceeds INT32_MAX."""
    if value > INT32_MAX:
        raise ValueError(f"{name}: {what} must be at most 2**31 - 1 = {INT32_MAX}{why}, got {value}")


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: on a GPU the driver's free memory plus what torch's caching
    allocator holds unused; on the CPU MemAvailable (and the cgroup's remaining limit, if lower); None for other
    device types (no information)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                avail = min(avail, int(limit) - int(f.read()))
    except (OSError, ValueError):
        pass
    return max(avail, 0)


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def check_fits_memory(name: str, nbytes: int, device: torch.device, what: str) -> None:
    """ValueError naming `name` when `nbytes` (what `what` needs) exceed the memory available on `device`
    (no check on devices without memory information)."""
    avail = available_memory(device)
    if avail is not None and nbytes > avail:
        raise ValueError(f"{name}: {what} needs {format_bytes(nbytes)}, more than the {format_bytes(avail)} "
                         f"available on {torch.device(device)}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0].dtype
    for n, t in zip(names[1:], tensors[1:]):
        if t.dtype != first:
            raise TypeError(f"{n} must have the dtype of {names[0]} ({first}), got {t.dtype}")


def default_sm_scale(sm_scale, head_dim: int) -> float:
    if sm_scale is None:
        return head_dim ** -0.5
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"sm_scale must be a float or None, got {type(sm_scale).__name__}")
    if not sm_scale > 0 or sm_scale == float("inf"):
        raise ValueError(f"sm_scale must be a finite positive number, got {sm_scale}")
    return float(sm_scale)
