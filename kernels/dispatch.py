"""The one dispatcher: which implementation of a kernel runs on this device, and why.

Every op in `kernels/` has the same faces: `reference` (plain jnp), Pallas implementations
(`"mosaic"`: Mosaic GPU, Hopper sm90 only; `"triton"`: Triton-lowered Pallas, sm80+ or any
platform with `interpret=True`) and `"xla"` (the reference, or an XLA expression of it).
A public op takes `impl=` and calls `select_impl` once per trace:

    from kernels.dispatch import select_impl
    impl = select_impl("my_op", impl, interpret=interpret,
                       unsupported={"triton": None if ok else "head_dim 80 is not a power of 2"})

* `"auto"` picks the first implementation of `preference` (default: mosaic, then triton) whose
  platform check and `unsupported[...]` reason are both None, else `"xla"`; it logs the choice
  and the reasons once per (op, choice, reason) on the logger `iva_jax.kernels`.
* `"pallas"` means "the best Pallas implementation for this device"; none -> ValueError.
* An explicit implementation that cannot run raises ValueError saying why (never a silent
  fallback and never a wrong answer).
* The environment variable `IVA_KERNELS_DISABLE=mosaic,triton` removes implementations from
  `"auto"` / `"pallas"` (to bisect a suspected kernel bug without editing code).
* A kernel (or a shape/flag class of it) that has not passed `experiments/check_kernels_gpu.py` on a
  real GPU reports an "unsupported" reason, so auto never picks it and an explicit impl raises;
  `IVA_KERNELS_ALLOW_UNVALIDATED=1` (`allow_unvalidated()`) lifts that for the check script itself.

Other kernel modules (grouped_matmul, selective_scan, ...) reuse `select_impl`,
`compute_capability` and `platform_reason`.  `describe()` reports, for each op of this module's
family, what `"auto"` picks on the current device and why (for `python -m iva_jax.env`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Mapping, Sequence

import jax

logger = logging.getLogger("iva_jax.kernels")

IMPLS = ("auto", "xla", "pallas", "triton", "mosaic")
PALLAS_IMPLS = ("mosaic", "triton")
_LOGGED: set[tuple[str, str, str]] = set()


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    platform: str  # "cpu", "cuda", "rocm", "tpu", ...
    kind: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int] | None  # CUDA only
    core_count: int | None  # multiprocessors (GPU) where known


@functools.lru_cache(maxsize=None)
def device_info() -> DeviceInfo:
    """The default device: platform, kind, CUDA compute capability and SM count."""
    dev = jax.devices()[0]
    platform = dev.platform
    cc = None
    if platform in ("gpu", "cuda"):
        version = str(getattr(dev.client, "platform_version", "")).lower()
        platform = "rocm" if "rocm" in version else "cuda"
        raw = getattr(dev, "compute_capability", None)
        if raw:
            major, _, minor = str(raw).partition(".")
            cc = (int(major), int(minor or 0))
    cores = getattr(dev, "core_count", None)
    return DeviceInfo(platform, str(getattr(dev, "device_kind", platform)), cc, cores)


def compute_capability() -> tuple[int, int] | None:
    """(major, minor) CUDA compute capability of the default device, None off CUDA."""
    return device_info().compute_capability


def _disabled() -> set[str]:
    return {s.strip() for s in os.environ.get("IVA_KERNELS_DISABLE", "").split(",") if s.strip()}


def allow_unvalidated() -> bool:
    """True when IVA_KERNELS_ALLOW_UNVALIDATED=1: kernels not yet GPU-validated may be selected (for checks)."""
    return os.environ.get("IVA_KERNELS_ALLOW_UNVALIDATED", "") == "1"


def platform_reason(impl: str, *, interpret: bool = False) -> str | None:
    """Why `impl` cannot run on the default device (None if it can), shapes aside."""
    if impl == "xla":
        return None
    info = device_info()
    cc = info.compute_capability
    where = f"{info.platform} ({info.kind})" if cc is None else f"sm{cc[0]}{cc[1]} ({info.kind})"
    if impl == "triton":
        if interpret:
            return None
        if info.platform != "cuda":
            return f"Triton Pallas needs a CUDA GPU, found {where}; pass interpret=True to emulate it"
        if cc is not None and cc < (8, 0):
            return f"Triton Pallas kernels here need sm80+, found {where}"
        return None
    if impl == "mosaic":
        if interpret:
            return "Mosaic GPU kernels have no interpret mode here"
        if info.platform != "cuda" or cc is None or cc[0] != 9:
            return f"Mosaic GPU kernels here use Hopper wgmma (sm90), found {where}"
        return None
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def _log_once(op: str, choice: str, reason: str) -> None:
    key = (op, choice, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("kernels: %s -> %s (%s)", op, choice, reason)


def select_impl(
    op: str,
    impl: str,
    *,
    interpret: bool = False,
    unsupported: Mapping[str, str | None] | None = None,
    preference: Sequence[str] = PALLAS_IMPLS,
    log: bool = True,
) -> str:
    """Resolve `impl` ("auto" | "xla" | "pallas" | "triton" | "mosaic") to a concrete one.

    `unsupported[name]` is the shape/dtype reason why Pallas implementation `name` cannot run
    (None or missing: it can); `preference` lists the Pallas implementations `auto` may pick,
    best first (an op leaves one out where it is not faster than XLA on this device).
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: unknown impl {impl!r}; expected one of {IMPLS}")
    unsupported = dict(unsupported or {})

    def reason(name: str) -> str | None:
        return platform_reason(name, interpret=interpret) or unsupported.get(name)

    if impl == "xla":
        return "xla"
    if impl in PALLAS_IMPLS:
        why = reason(impl)
        if why:
            raise ValueError(f"{op}: impl={impl!r} cannot run: {why}")
        return impl
    disabled = _disabled()
    order = [p for p in (preference if impl == "auto" else PALLAS_IMPLS) if p not in disabled]
    reasons = []
    for name in order:
        why = reason(name)
        if why is None:
            if log:
                _log_once(op, name, f"impl={impl}, {device_info().kind}")
            return name
        reasons.append(f"{name}: {why}")
    for name in set(PALLAS_IMPLS) & disabled:
        reasons.append(f"{name}: disabled by IVA_KERNELS_DISABLE")
    if impl == "pallas":
        raise ValueError(f"{op}: impl='pallas' but no Pallas kernel can run: " + "; ".join(reasons))
    if not order or set(order) != set(preference):
        skipped = [p for p in PALLAS_IMPLS if p not in preference]
        reasons += [f"{p}: not faster than XLA here" for p in skipped]
    if log:
        _log_once(op, "xla", "; ".join(reasons) or "no Pallas kernel preferred")
    return "xla"


def explain(op: str, impl: str = "auto", **kwargs) -> tuple[str, str]:
    """(choice, reason) without logging: what `select_impl` would pick, in words."""
    try:
        choice = select_impl(op, impl, log=False, **kwargs)
    except ValueError as e:
        return "error", str(e)
    interpret = kwargs.get("interpret", False)
    unsupported = dict(kwargs.get("unsupported") or {})
    notes = []
    for name in PALLAS_IMPLS:
        why = platform_reason(name, interpret=interpret) or unsupported.get(name)
        if name in _disabled():
            why = "disabled by IVA_KERNELS_DISABLE"
        if why is None and name not in kwargs.get("preference", PALLAS_IMPLS):
            why = "not faster than XLA here"
        notes.append(f"{name}: {'ok' if why is None else why}")
    return choice, "; ".join(notes)


def describe() -> dict[str, dict[str, str]]:
    """For each op, the implementation `auto` picks on this device for a typical shape, and why."""
    import importlib  # lazy: those modules import us; kernels/__init__ shadows them with functions

    rms_norm, flash_attention, swiglu, selective_scan = (
        importlib.import_module(f"kernels.{m}") for m in ("rms_norm", "flash_attention", "swiglu", "selective_scan"))
    info = device_info()
    out = {"device": {"platform": info.platform, "kind": info.kind,
                      "compute_capability": str(info.compute_capability)}}
    for name, fn in [("rms_norm", rms_norm.explain_auto), ("flash_attention", flash_attention.explain_auto),
                     ("swiglu", swiglu.explain_auto), ("selective_scan", selective_scan.explain_auto)]:
        for label, (choice, why) in fn().items():
            out[f"{name}[{label}]"] = {"impl": choice, "why": why}
    return out
