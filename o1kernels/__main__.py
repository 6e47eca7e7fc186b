"""`python -m o1kernels`: versions, GPUs, the compiled extension and each backend's availability (o1kernels.info)."""
from ._info import info

info()
