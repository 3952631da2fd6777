"""Telemetry as JSON lines (the seed's schema), with optional TensorBoard mirroring.

One record per logged step:

    {"step": int, "time": unix seconds,
     "speed":   {"tokens_per_sec": float, "step_time_ms": float},
     "memory":  {"vram_gb": float, "source": "device" | "host_rss"},
     "quality": {"loss": float, "ppl": float, "grad_norm": float, "lr": float, "skipped": int, ...},
     "moe": {...}, "hrm": {...}, "quant": {...}}          # only when the caller has them

`memory.vram_gb` is the device's bytes in use (peak when the runtime reports it) where jax exposes
memory stats (GPU/TPU); on CPU it is this process's peak resident set size, and `source` says which.
TensorBoard scalars are written only when `tensorboard_dir` is given *and* tensorboardX is
importable (it is not a dependency; without it a warning says so).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np

REQUIRED = {"speed": ("tokens_per_sec", "step_time_ms"), "memory": ("vram_gb", "source"),
            "quality": ("loss", "ppl")}
OPTIONAL_BLOCKS = ("moe", "hrm", "quant", "rl", "eval", "health")


def memory_gb(device: Optional[jax.Device] = None) -> Dict[str, Any]:
    """{"vram_gb", "source"}: device memory in use (peak if reported) or, without stats, host peak RSS."""
    dev = device or jax.local_devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - backends without the call
        stats = None
    if stats and ("peak_bytes_in_use" in stats or "bytes_in_use" in stats):
        used = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
        return {"vram_gb": used / 1e9, "source": "device"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"vram_gb": rss_bytes / 1e9, "source": "host_rss"}


def _num(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    a = np.asarray(v)
    if a.ndim == 0:
        x = a.item()
        if isinstance(x, float) and not math.isfinite(x):
            return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
        return x
    return a.tolist()


def make_record(step: int, metrics: Mapping[str, Any], *, tokens: Optional[float] = None,
                step_time_s: Optional[float] = None, memory: Optional[Dict[str, Any]] = None,
                blocks: Optional[Mapping[str, Mapping[str, Any]]] = None,
                speed_extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """A schema record from a train-step metrics dict (scalars; NaN becomes null).

    `speed_extra` adds keys to the speed block (e.g. `includes_compile` for a first step)."""
    m = {k: _num(v) for k, v in jax.device_get(dict(metrics)).items()}
    tokens = float(m.get("tokens", 0.0) if tokens is None else tokens)
    dt = float(step_time_s) if step_time_s else float("nan")
    rec: Dict[str, Any] = {
        "step": int(step), "time": time.time(),
        "speed": {"tokens_per_sec": tokens / dt if dt == dt and dt > 0 else 0.0,
                  "step_time_ms": dt * 1e3 if dt == dt else 0.0, **dict(speed_extra or {})},
        "memory": memory if memory is not None else memory_gb(),
        "quality": {},
    }
    q = rec["quality"]
    loss = m.get("loss")
    q["loss"] = loss
    if "ppl" in m:
        q["ppl"] = m["ppl"]
    else:
        q["ppl"] = math.exp(min(loss, 700.0)) if isinstance(loss, (int, float)) else None
    for k in ("ce", "nll", "grad_norm", "lr", "skipped", "z_loss", "aux_loss", "tokens"):
        if k in m:
            q[k] = m[k]
    health = {k: m[k] for k in ("grad_norm_avg", "loss_avg", "grad_spike", "loss_spike", "grad_spikes",
                                "loss_spikes", "lr_scale", "plateau_count", "consecutive_skips") if k in m}
    if health:
        rec["health"] = health
    extra = {k: v for k, v in m.items() if k.startswith("model/") or k.startswith("mtp")}
    if extra:
        q.update(extra)
    for name, block in (blocks or {}).items():
        if block:
            rec[name] = {k: _num(v) for k, v in jax.device_get(dict(block)).items()}
    return rec


def validate_record(rec: Mapping[str, Any]) -> None:
    """ValueError naming the first missing or mistyped field of a telemetry record."""
    if not isinstance(rec.get("step"), int):
        raise ValueError(f"telemetry record needs an int 'step', got {rec.get('step')!r}")
    for block, keys in REQUIRED.items():
        if not isinstance(rec.get(block), Mapping):
            raise ValueError(f"telemetry record lacks the {block!r} block")
        for k in keys:
            if k not in rec[block]:
                raise ValueError(f"telemetry record lacks {block}.{k}")
    for k in ("tokens_per_sec", "step_time_ms"):
        if not isinstance(rec["speed"][k], (int, float)) or rec["speed"][k] < 0:
            raise ValueError(f"speed.{k}={rec['speed'][k]!r} must be a number >= 0")
    if rec["memory"]["source"] not in ("device", "host_rss"):
        raise ValueError(f"memory.source={rec['memory']['source']!r} must be 'device' or 'host_rss'")
    for b in OPTIONAL_BLOCKS:
        if b in rec and not isinstance(rec[b], Mapping):
            raise ValueError(f"telemetry block {b!r} must be a mapping")


def _tb_writer(logdir: str):
    try:
        from tensorboardX import SummaryWriter  # type: ignore
    except ImportError:
        logging.getLogger(__name__).warning("tensorboard_dir=%s ignored: tensorboardX is not installed", logdir)
        return None
    return SummaryWriter(logdir)


class Telemetry:
    """Append schema records to a JSONL file (process 0 only) and mirror scalars to TensorBoard."""

    def __init__(self, path: Optional[str | Path] = None, tensorboard_dir: Optional[str] = None) -> None:
        self.path = Path(path) if path is not None else None
        self._main = jax.process_index() == 0
        if self.path is not None and self._main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = _tb_writer(tensorboard_dir) if (tensorboard_dir and self._main) else None
        self.tensorboard_active = self.tb is not None

    def log(self, step: int, metrics: Mapping[str, Any], **kw: Any) -> Dict[str, Any]:
        """Build, validate and write one record (see `make_record` for the keywords); return it."""
        rec = make_record(step, metrics, **kw)
        validate_record(rec)
        if self._main and self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for block in ("speed", "memory", "quality", "health") + OPTIONAL_BLOCKS:
                for k, v in (rec.get(block) or {}).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.tb.add_scalar(f"{block}/{k}", v, step)
        return rec

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: str | Path) -> list:
    """All records of a telemetry file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
