"""Launchers of the Triton kernels: check, allocate, launch (the thin ops layer)."""
