"""Triton kernels and their launchers (no path choices, no fallbacks: those live in ssattn.ops).

Each module is imported lazily by ssattn._backends, only when Triton imports.
"""
