"""State-space and recurrent sequence mixers: selective scan (4 implementations), Mamba, Mamba-2 (SSD),
RetNet retention, and lighter mixers (RWKV time-mix, Hyena long convolution, top-k sparse attention)."""

from iva_jax.ssm.scan import selective_scan, selective_scan_bld  # noqa: F401
