"""Mosaic GPU (Hopper) flash attention kernels: placeholder until implemented."""


def unsupported_reason(dtype, head_dim, *, backward=False):
    return "Mosaic attention kernel not implemented yet"
