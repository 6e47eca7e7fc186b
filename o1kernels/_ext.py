"""Loader for the compiled extension o1kernels._C (optional).

The package always imports; when the extension is missing or was built without
CUDA, the compiled backends report why they are unavailable.
"""
from __future__ import annotations

try:
    from . import _C  # noqa: F401

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # the extension is optional
    _C = None
    _IMPORT_ERROR = f"the compiled extension o1kernels._C is not available ({type(exc).__name__}: {exc})"


def unavailable_reason(device_type: str) -> str | None:
    if _C is None:
        return _IMPORT_ERROR
    if device_type == "cuda" and not getattr(_C, "WITH_CUDA", False):
        return "o1kernels._C was built without CUDA kernels"
    if device_type not in ("cuda", "cpu"):
        return f"no compiled kernels for device type {device_type!r}"
    return None
