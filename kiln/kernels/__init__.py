"""Triton kernels and their plain-torch references, and the CPU's C++ kernels (cpu/, built by
cpu_ops.py). Imports only torch and triton."""
