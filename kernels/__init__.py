"""Triton kernels, shipped as ssattn.kernels (never a top-level `kernels` module).

Each module is imported lazily by ssattn._backends, only when Triton imports.
"""
