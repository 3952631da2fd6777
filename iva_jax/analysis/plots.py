"""PNG plots from telemetry JSONL and from `experiments/profile_kernels.py` JSON (matplotlib, Agg canvas).

    plot_loss_curves({"lora": "runs/sft/telemetry.jsonl"}, "loss.png")          # quality.loss (+ eval.eval_loss)
    plot_reward_curves("runs/grpo/telemetry.jsonl", "reward.png")               # rl.reward_mean +- rl.reward_std
    plot_curves(records, ["hrm.halt_rate", "hrm.avg_steps"], "halting.png")     # any dotted keys
    plot_kernel_speed("experiments/results/kernels_h100_2026-11-22_profile.json", "kernels.png")
    plot_scaling_law(compute, loss, fit, "scaling.png")

Figures are drawn on their own Agg canvas (the global pyplot backend is left alone, so notebooks keep
theirs); every function returns the path of the PNG it wrote.  A telemetry source is a path, a list of
records, or a {label: path-or-records} mapping for several runs.  Records without a key are skipped
(HRM logs train and eval records in one file), and a key found in no record raises ValueError.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

Records = List[Mapping[str, Any]]
Source = Union[str, Path, Records, Mapping[str, Union[str, Path, Records]]]
OURS_COLOR, ANCHOR_COLOR, OTHER_COLOR = "#d62728", "#7f7f7f", "#1f77b4"


def _figure(nrows: int = 1, ncols: int = 1, size: Tuple[float, float] = (6.4, 4.0)):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the test and plots extras
        raise ImportError("iva_jax.analysis.plots needs matplotlib: pip install 'iva-jax[plots]'") from e
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, out: Union[str, Path]) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; got the path {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def read_records(path: Union[str, Path]) -> Records:
    """Records of a telemetry JSONL file (blank lines skipped; a bad line raises naming its number)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"telemetry file {p} does not exist")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i} is not JSON: {e}") from e
    return out


def _runs(source: Source) -> Dict[str, Records]:
    if isinstance(source, (str, Path)):
        return {Path(source).stem: read_records(source)}
    if isinstance(source, Mapping):
        return {str(k): (read_records(v) if isinstance(v, (str, Path)) else list(v)) for k, v in source.items()}
    return {"run": list(source)}


def get_path(rec: Mapping[str, Any], key: str) -> Optional[float]:
    """Value of a dotted key ("quality.loss") in a record, as a float; None when absent or not numeric."""
    node: Any = rec
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    return float(node)


def series(records: Records, key: str, x_key: str = "step") -> Tuple[np.ndarray, np.ndarray]:
    """(x, y) over the records that have both keys, sorted by x."""
    pts = [(get_path(r, x_key), get_path(r, key)) for r in records]
    pts = sorted((x, y) for x, y in pts if x is not None and y is not None)
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts)
    return np.asarray(x), np.asarray(y)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or y.size < window:
        return y
    kernel = np.ones(window) / window
    head = np.cumsum(y[:window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def plot_curves(source: Source, keys: Sequence[str], out: Union[str, Path], *, x_key: str = "step",
                title: Optional[str] = None, smooth: int = 1, logy: bool = False,
                band: Optional[Mapping[str, str]] = None) -> Path:
    """One panel per key, one line per run; `band[key]` names a key whose value draws a +- band."""
    runs = _runs(source)
    if not keys:
        raise ValueError("plot_curves needs at least one key")
    fig, axes = _figure(1, len(keys))
    for ax, key in zip(axes[0], keys):
        drawn = 0
        for label, recs in runs.items():
            x, y = series(recs, key, x_key)
            if x.size == 0:
                continue
            drawn += 1
            line, = ax.plot(x, _smooth(y, smooth), marker="o" if x.size < 30 else None, ms=3, label=label)
            if band and key in band:
                bx, by = series(recs, band[key], x_key)
                if bx.size == x.size:
                    ax.fill_between(x, y - by, y + by, color=line.get_color(), alpha=0.15)
        if not drawn:
            found = sorted({k for recs in runs.values() for r in recs for k in r})
            raise ValueError(f"no record has {key!r} (and {x_key!r}); top-level keys present: {found}")
        ax.set_xlabel(x_key)
        ax.set_ylabel(key)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def _first_key(runs: Dict[str, Records], candidates: Sequence[str]) -> Optional[str]:
    for k in candidates:
        if any(get_path(r, k) is not None for recs in runs.values() for r in recs):
            return k
    return None


def plot_loss_curves(source: Source, out: Union[str, Path], *, smooth: int = 1, title: str = "loss") -> Path:
    """Training loss (quality.loss, or a top-level loss as HRM logs it) and, when logged, the eval loss."""
    runs = _runs(source)
    train = _first_key(runs, ("quality.loss", "loss"))
    if train is None:
        raise ValueError("no record has quality.loss or loss")
    keys = [train] + [k for k in [_first_key(runs, ("eval.eval_loss", "eval.loss"))] if k]
    return plot_curves(runs, keys, out, smooth=smooth, title=title)


def plot_reward_curves(source: Source, out: Union[str, Path], *, smooth: int = 1, title: str = "reward") -> Path:
    """RL reward mean with a +- std band (rl.reward_mean / rl.reward_std), plus the KL when logged."""
    runs = _runs(source)
    mean = _first_key(runs, ("rl.reward_mean", "reward_mean"))
    if mean is None:
        raise ValueError("no record has rl.reward_mean or reward_mean")
    keys = [mean] + [k for k in [_first_key(runs, ("rl.kl", "kl"))] if k]
    return plot_curves(runs, keys, out, smooth=smooth, title=title,
                       band={mean: mean.replace("reward_mean", "reward_std")})


# ------------------------------------------------------------------------------------------------ kernels
def _case_and_label(r: Mapping[str, Any]) -> Tuple[str, str]:
    """(panel case, bar label) of a profile row: explicit `case`/`label` fields, else parsed from the name."""
    if "case" in r and "label" in r:
        return str(r["case"]), str(r["label"])
    name = str(r.get("name", ""))
    if " | " in name:
        case, label = name.split(" | ", 1)
        return case, label
    if "H" in r:  # "rms 32768x4096 ours-triton" -> ("rms 32768x4096", "ours-triton")
        prefix = " ".join(name.split()[:2])
        return prefix, name[len(prefix):].strip() or str(r.get("impl", "?"))
    return name, str(r.get("impl", name))


def _is_ours(label: str) -> bool:
    return label.startswith("ours")


def kernel_panels(profile: Mapping[str, Any], groups: Optional[Sequence[str]] = None,
                  skip_groups: Sequence[str] = ("sweep", "error", "ceiling", "ratio", "check")
                  ) -> Dict[Tuple[str, str], List[Dict[str, Any]]]:
    """{(group, case): [{"label", "figure", "unit", "ms"}]} from a profile_kernels JSON (rows with a figure)."""
    panels: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in profile.get("rows", []):
        g = r.get("group")
        if g in skip_groups or (groups is not None and g not in groups) or r.get("figure") is None:
            continue
        case, label = _case_and_label(r)
        panels.setdefault((g, case), []).append({"label": label, "figure": float(r["figure"]),
                                                 "unit": r.get("unit", ""), "ms": r.get("ms")})
    return panels


def plot_kernel_speed(profile: Union[str, Path, Mapping[str, Any]], out: Union[str, Path], *,
                      groups: Optional[Sequence[str]] = None, ncols: int = 3, max_panels: int = 32) -> Path:
    """Horizontal bars per (group, case): ours in red, anchors in grey, with the run's ceilings as lines
    (copy bandwidth on GB/s panels, matmul peak on TFLOP/s panels)."""
    if isinstance(profile, (str, Path)):
        p = Path(profile)
        if not p.exists():
            raise ValueError(f"profile JSON {p} does not exist")
        profile = json.loads(p.read_text())
    panels = kernel_panels(profile, groups)
    if not panels:
        raise ValueError(f"no benchmark rows with a figure (groups={groups}); groups present: "
                         f"{sorted({r.get('group') for r in profile.get('rows', [])})}")
    items = list(panels.items())[:max_panels]
    ceil = dict((profile.get("meta") or {}).get("ceilings") or {})
    ncols = max(1, min(ncols, len(items)))
    nrows = math.ceil(len(items) / ncols)
    height = max(2.2, 0.32 * max(len(v) for _, v in items) + 1.2)
    fig, axes = _figure(nrows, ncols, size=(5.6, height))
    for ax, ((group, case), bars) in zip(axes.ravel(), items):
        labels = [b["label"] for b in bars]
        vals = [b["figure"] for b in bars]
        colors = [OURS_COLOR if _is_ours(lb) else ANCHOR_COLOR for lb in labels]
        y = np.arange(len(bars))
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        unit = bars[0]["unit"]
        ax.set_xlabel(unit, fontsize=8)
        ax.set_title(f"{group}: {case}", fontsize=8)
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v:.0f}", va="center", fontsize=6)
        ref = None
        if unit == "GB/s":
            ref = ("copy", ceil.get("copy") or ceil.get("copy_jax"))
        elif unit == "TFLOP/s":
            ref = ("matmul peak", ceil.get("mm_torch") or ceil.get("mm_jax"))
        if ref and ref[1]:
            ax.axvline(ref[1], color="k", ls="--", lw=0.8)
            ax.text(ref[1], len(bars) - 0.5, f"{ref[0]} {ref[1]:.0f}", fontsize=6, ha="right", va="bottom")
        ax.tick_params(axis="x", labelsize=7)
    for ax in axes.ravel()[len(items):]:
        ax.set_visible(False)
    meta = profile.get("meta") or {}
    fig.suptitle(f"kernels on {meta.get('device', '?')} (jax {meta.get('jax', '?')}, {meta.get('date', '?')}): "
                 "ours red, anchors grey", fontsize=9)
    return _save(fig, out)


def plot_scaling_law(compute: Sequence[float], loss: Sequence[float], fit: Any, out: Union[str, Path], *,
                     extrapolate: float = 10.0, title: str = "loss vs compute") -> Path:
    """Data and a fitted (Broken)PowerLaw on log-log axes, extended `extrapolate`x beyond the data."""
    c = np.asarray(compute, np.float64)
    l_ = np.asarray(loss, np.float64)
    if c.shape != l_.shape or c.size == 0 or np.any(c <= 0) or np.any(l_ <= 0):
        raise ValueError(f"compute {c.shape} and loss {l_.shape} must be same-length, non-empty and > 0")
    fig, axes = _figure()
    ax = axes[0, 0]
    ax.loglog(c, l_, "o", ms=4, label="runs")
    grid = np.geomspace(c.min(), c.max() * extrapolate, 200)
    ax.loglog(grid, fit.predict(grid), "-", color=OURS_COLOR, label="fit")
    bp = getattr(fit, "breakpoint", None)
    if bp is not None:
        ax.axvline(bp, color="k", ls=":", lw=0.8)
        ax.set_title(f"{title}: slopes {fit.slope_low:.3f} / {fit.slope_high:.3f}, break {bp:.3g}, "
                     f"R2 {fit.r2:.4f}", fontsize=9)
    else:
        ax.set_title(f"{title}: slope {fit.slope:.3f}, R2 {fit.r2:.4f}", fontsize=9)
    ax.set_xlabel("compute")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out)


__all__ = ["read_records", "get_path", "series", "plot_curves", "plot_loss_curves", "plot_reward_curves",
           "kernel_panels", "plot_kernel_speed", "plot_scaling_law"]
