"""Triton kernels for the DisEnt step and their PyTorch reference twins (installed as dfa_fast.kernels).

Importing this package imports nothing heavy; `dfa_fast.ops` picks `triton_ops` or `reference`.
"""
