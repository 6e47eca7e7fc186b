"""Backend discovery and selection shared by every public op.

Backends:
  torch  - readable reference in plain torch ops, any device.
  triton - Triton kernels; on CUDA devices, or on the CPU through Triton's
           interpreter when TRITON_INTERPRET=1 was set before o1kernels was imported.
  cuda   - compiled CUDA kernels of the o1kernels._C extension (CUDA tensors).
  cpu    - compiled C++ kernels of the o1kernels._C extension (CPU tensors).
  auto   - the fastest verified backend for the tensors' device.
"""
from __future__ import annotations

import os

import torch

from .capabilities import backend_unsupported_reason

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")


def _triton_reason(device_type: str) -> str | None:
    """None when Triton can run on `device_type`, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({exc})"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return None
        return "Triton runs on the CPU only under its interpreter: set TRITON_INTERPRET=1 before importing o1kernels"
    return f"Triton does not support device type {device_type!r}"


def _compiled_reason(device_type: str) -> str | None:
    from . import _ext

    return _ext.unavailable_reason(device_type)


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else a human-readable reason."""
    dt = device.type
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_reason(dt)
    if backend == "cuda":
        if dt != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
        return _compiled_reason("cuda")
    if backend == "cpu":
        if dt != "cpu":
            return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
        return _compiled_reason("cpu")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def available_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """Map each concrete backend to None (usable on `device`) or the reason it is not."""
    device = torch.device(device)
    return {b: backend_unavailable_reason(b, device) for b in BACKENDS if b != "auto"}


# Order in which backend="auto" tries backends per device type: Triton, then the compiled CUDA kernels. Both
# passed every GPU test on an H200 on 2026-11-28, but that was the kernels before the plan rewrite; the current
# ones (plans, direct path, tile tables, the step-reward GEMM) have run only under Triton's interpreter, the C++
# CPU build and offline compiles. Which of the two is faster per shape is measured by plan.tune() (attention) on
# the GPU, not assumed.
_AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}


def resolve_backend(backend: str, device: torch.device, supported: tuple[str, ...], spec=None) -> str:
    """Return the concrete backend to run, or raise ValueError/RuntimeError saying why not.

    `supported` lists the backends the calling op implements; `spec` (an o1kernels.capabilities.AttentionSpec, for
    attention ops) what the call needs: "auto" skips the backends that do not implement it (falling back to the
    torch reference), an explicit backend that does not raises ValueError saying why.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for cand in _AUTO_ORDER.get(device.type, ("torch",)):
            if (cand in supported and backend_unavailable_reason(cand, device) is None
                    and (spec is None or backend_unsupported_reason(cand, spec) is None)):
                return cand
        return "torch"
    if backend not in supported:
        raise ValueError(f"backend {backend!r} is not implemented for this op (implemented: {supported})")
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
    reason = None if spec is None else backend_unsupported_reason(backend, spec)
    if reason is not None:
        raise ValueError(reason)
    return backend
