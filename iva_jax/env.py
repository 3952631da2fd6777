"""Environment report: devices, library versions, and which kernel `impl="auto"` picks for each op, and why.

    python -m iva_jax.env            # text
    python -m iva_jax.env --json     # one JSON object (what `report()` returns)

Versions are read from the installed package metadata, so torch / transformers are reported without
being imported (iva_jax never imports torch).  Kernel choices come from `kernels.dispatch.describe()`
plus the `explain_auto()` of every other kernel module; a module that is missing or fails to import
is reported as "not available" with the error, never skipped silently.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional

# distribution names (pip) shown in the report; torch and friends are optional
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "chex",
            "numpy", "ml_dtypes", "safetensors", "gguf", "torch", "transformers", "triton", "matplotlib")
OPTIONAL = {"jax-cuda12-plugin", "jax-cuda13-plugin", "torch", "transformers", "triton", "matplotlib", "gguf"}
# kernel modules beyond the dispatcher's own family (rms_norm, flash_attention, swiglu)
EXTRA_KERNELS = ("grouped_matmul", "selective_scan", "decode_attention", "quant_matmul")
ENV_VARS = ("IVA_KERNELS_DISABLE", "IVA_KERNELS_ALLOW_UNVALIDATED", "JAX_PLATFORMS", "XLA_FLAGS",
            "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES")


def versions() -> Dict[str, Optional[str]]:
    """Installed version of each package in PACKAGES (None when not installed), plus python."""
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def devices() -> Dict[str, Any]:
    """Default backend and, per local device: id, platform, kind, compute capability, memory limit (GB)."""
    import jax

    from kernels import dispatch

    info = dispatch.device_info()
    rows = []
    for d in jax.local_devices():
        mem = None
        try:
            stats = d.memory_stats() or {}
            if "bytes_limit" in stats:
                mem = round(stats["bytes_limit"] / 1e9, 2)
        except Exception:  # noqa: BLE001 - backends without memory stats
            pass
        rows.append({"id": d.id, "platform": d.platform, "kind": str(getattr(d, "device_kind", d.platform)),
                     "compute_capability": getattr(d, "compute_capability", None), "memory_gb": mem})
    cc = info.compute_capability
    return {"backend": jax.default_backend(), "count": jax.device_count(), "local_count": jax.local_device_count(),
            "process_count": jax.process_count(), "platform": info.platform, "kind": info.kind,
            "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}", "core_count": info.core_count,
            "devices": rows}


def _explain_rows(op: str, fn) -> Dict[str, Dict[str, str]]:
    return {f"{op}[{label}]": {"impl": choice, "why": why} for label, (choice, why) in fn().items()}


def _grouped_matmul_explain() -> Dict[str, tuple]:
    """kernels.grouped_matmul has no explain_auto: ask the dispatcher with the arguments its picker uses."""
    from kernels import dispatch

    mod = importlib.import_module("kernels.grouped_matmul")
    choice = mod._pick_impl("auto", False) if hasattr(mod, "_pick_impl") else None
    expl = dispatch.explain("grouped_matmul", preference=("triton",),
                            unsupported={"mosaic": "no Mosaic GPU grouped matmul yet (use triton)"})
    return {"any shape": (choice or expl[0], expl[1])}


def kernel_choices() -> Dict[str, Dict[str, str]]:
    """{op[case]: {"impl", "why"}} for every kernel module: what `impl="auto"` picks on this device."""
    from kernels import dispatch

    out: Dict[str, Dict[str, str]] = {}
    try:
        desc = dispatch.describe()
        desc.pop("device", None)
        out.update(desc)
    except Exception as e:  # noqa: BLE001
        out["rms_norm/flash_attention/swiglu"] = {"impl": "not available", "why": f"{type(e).__name__}: {e}"}
    for op in EXTRA_KERNELS:
        try:
            mod = importlib.import_module(f"kernels.{op}")
            fn = getattr(mod, "explain_auto", None)
            if fn is None and op == "grouped_matmul":
                fn = _grouped_matmul_explain
            if fn is None:
                out[op] = {"impl": "unknown", "why": f"kernels.{op} has no explain_auto()"}
                continue
            out.update(_explain_rows(op, fn))
        except Exception as e:  # noqa: BLE001 - a module not landed yet, or broken on this install
            out[op] = {"impl": "not available", "why": f"{type(e).__name__}: {e}"}
    return out


def fp8_decision() -> Dict[str, Any]:
    """Whether native fp8 matmuls run here (iva_jax.quant's device guard), and the guard's reason."""
    try:
        from iva_jax.quant.fp8 import fp8_unsupported_reason
    except Exception as e:  # noqa: BLE001
        return {"enabled": None, "why": f"not available: iva_jax.quant.fp8 ({type(e).__name__}: {e})"}
    why = fp8_unsupported_reason()
    return {"enabled": why is None, "why": why or "sm89+ GPU: fp8 (e4m3) matmuls allowed"}


def report() -> Dict[str, Any]:
    """Everything `python -m iva_jax.env` prints: versions, devices, kernel choices, fp8 guard, env vars."""
    return {"versions": versions(), "platform": f"{platform.system()} {platform.machine()}",
            "devices": devices(), "kernels": kernel_choices(), "fp8": fp8_decision(),
            "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ}}


def format_report(rep: Dict[str, Any]) -> str:
    """The report as aligned text."""
    lines: List[str] = []
    v = rep["versions"]
    lines.append(f"iva-jax environment ({rep['platform']}, python {v['python']})")
    lines.append("")
    lines.append("versions:")
    for name in PACKAGES:
        if v.get(name) is None and name in ("jax-cuda12-plugin", "jax-cuda13-plugin"):
            continue
        shown = v.get(name) or ("not installed (optional)" if name in OPTIONAL else "NOT INSTALLED")
        lines.append(f"  {name:<18} {shown}")
    d = rep["devices"]
    lines.append("")
    lines.append(f"devices: backend={d['backend']} count={d['count']} (local {d['local_count']}, "
                 f"processes {d['process_count']})")
    lines.append(f"  default: {d['kind']} platform={d['platform']} compute_capability={d['compute_capability']} "
                 f"cores={d['core_count']}")
    shown = d["devices"][:8]
    for r in shown:
        mem = "" if r["memory_gb"] is None else f" {r['memory_gb']} GB"
        cc = "" if r["compute_capability"] is None else f" cc {r['compute_capability']}"
        lines.append(f"  [{r['id']}] {r['platform']} {r['kind']}{cc}{mem}")
    if len(d["devices"]) > len(shown):
        lines.append(f"  ... {len(d['devices']) - len(shown)} more")
    lines.append("")
    lines.append('kernels (what impl="auto" picks here, and why):')
    width = max((len(k) for k in rep["kernels"]), default=10)
    for op, r in rep["kernels"].items():
        lines.append(f"  {op:<{width}}  -> {r['impl']}")
        lines.append(f"  {'':<{width}}     {r['why']}")
    f = rep["fp8"]
    state = {True: "enabled", False: "disabled", None: "unknown"}[f["enabled"]]
    lines.append("")
    lines.append(f"fp8: {state} ({f['why']})")
    if rep["env"]:
        lines.append("")
        lines.append("environment variables:")
        for k, val in rep["env"].items():
            lines.append(f"  {k}={val}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iva_jax.env", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    rep = report()
    print(json.dumps(rep, indent=1, default=str) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
