"""Build script for o1kernels.

The Python package always installs. The compiled extension o1kernels._C is
added by the csrc issue; until then the package is pure Python.
"""
from setuptools import find_packages, setup

setup(
    name="o1kernels",
    version="0.1.0",
    description="GPU kernels for o1-style test-time-compute decoding: tree attention and fused step rewards",
    packages=find_packages(include=["o1kernels", "o1kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "safetensors", "tqdm"],
    extras_require={"test": ["pytest"]},
)
