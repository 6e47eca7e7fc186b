"""The GPU a Triton launch compiles for, as the launchers' tables see it, and the device guard of every launcher.

gpu_target(device) -> Target | None: a CUDA device's compute capability major, the shared memory one program may
use (the opt-in limit) and its multiprocessor count; None on the CPU, where the kernels run under Triton's
interpreter with the small interpreter tiles. compile_for(target) makes the launchers choose the launch parameters
of `target` for CPU tensors too: the offline resource sweep (tools/triton_sweep.py) records every launch that way on a machine
without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability major (9: Hopper)
    smem: int  # bytes of shared memory one program may use (opt-in limit)
    sms: int  # multiprocessors


# H100 / H200: 227 KB of shared memory per block after opt-in (232,448 B; 1 KB more per block is reserved), 132 SMs.
SM90 = Target(arch=9, smem=232448, sms=132)

_override: Target | None = None


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(props.major, props.shared_memory_per_block_optin, props.multi_processor_count)


def gpu_target(device: torch.device) -> Target | None:
    """The GPU the kernels for `device` compile for; None: Triton's interpreter (CPU)."""
    if _override is not None:
        return _override
    if device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def compile_for(target: Target):
    """Within the block every launcher chooses `target`'s launch parameters whatever the tensors' device."""
    global _override
    previous, _override = _override, target
    try:
        yield
    finally:
        _override = previous


def device_guard(device: torch.device):
    """Launch on `device`, not on the current CUDA device (a cuda:1 tensor launched on cuda:0 faults)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
