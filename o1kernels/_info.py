"""`o1kernels.info()` / `python -m o1kernels`: what this installation can run on this machine.

Prints the versions (o1kernels, python, torch with its CUDA, triton), the GPUs torch sees, whether the compiled
extension o1kernels._C was built and with CUDA kernels (and what setup.py recorded about its build), the CPU
threads, and every backend's availability per device type with the reason when it is unavailable.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

BUILD_RECORD = Path(__file__).with_name("_build_info.json")  # written by setup.py when it builds or skips _C


def facts() -> dict:
    """The facts info() prints, as a dict."""
    import torch

    from . import __version__, _ext
    from ._backend import available_backends
    from ._cli import physical_cores_available

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # optional at run time on the CPU
        triton_version = f"not importable ({type(exc).__name__}: {exc})"
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    if _ext._C is None:
        extension = f"not available: {_ext._IMPORT_ERROR}"
    else:
        kernels = "CUDA + C++ CPU kernels" if getattr(_ext._C, "WITH_CUDA", False) else "C++ CPU kernels only (no CUDA)"
        extension = f"built, {kernels} ({_ext._C.__file__})"
    try:
        build_record = json.loads(BUILD_RECORD.read_text())
    except (OSError, ValueError):
        build_record = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "o1kernels": f"{__version__} ({Path(__file__).parent})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'})",
        "triton": triton_version,
        "gpus": gpus or ["none visible to torch (torch.cuda.is_available() is False)"],
        "extension": extension,
        "build_record": build_record,
        "cpu": f"{physical_cores_available()} physical cores available, torch uses {torch.get_num_threads()} threads, "
               f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        "backends": {dev: available_backends(dev) for dev in devices},
    }


def info(file=None) -> None:
    """Print versions, GPUs, the compiled extension's state and each backend's availability (with why not)."""
    out = sys.stdout if file is None else file
    f = facts()
    for key in ("o1kernels", "python", "torch", "triton"):
        print(f"{key:<13} {f[key]}", file=out)
    print(f"{'GPUs':<13} " + "; ".join(f["gpus"]), file=out)
    print(f"{'o1kernels._C':<13} {f['extension']}", file=out)
    record = f["build_record"]
    if record and "not available" in f["extension"]:
        print(f"{'':<13} at install, setup.py recorded: {record.get('outcome')}: {record.get('detail')}", file=out)
    print(f"{'CPU':<13} {f['cpu']}", file=out)
    for device, backends in f["backends"].items():
        print(f"backends on {device}:", file=out)
        for name, reason in backends.items():
            print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}", file=out)
