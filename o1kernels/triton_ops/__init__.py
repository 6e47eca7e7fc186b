"""Triton kernels and their launchers (one module per op).

These modules import triton at import time; the public ops import them lazily, only when
backend "triton" is selected. On the CPU they run through Triton's interpreter
(TRITON_INTERPRET=1 set before o1kernels is imported).
"""
