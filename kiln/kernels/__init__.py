"""Triton kernels and their plain-torch references (imports only torch and triton)."""
