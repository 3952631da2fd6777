"""Analysis helpers for runs: scaling-law fits (`scaling_law`) and PNG plots (`plots`, needs matplotlib).

Nothing here imports matplotlib until a plot function is called.
"""

from iva_jax.analysis.scaling_law import BrokenPowerLaw, PowerLaw, fit_broken_power_law, fit_power_law  # noqa: F401
