"""`fit`: the training loop shared by the SFT / HRM / RL scripts (model-agnostic).

    result = fit(train_step, state, batches, config, checkpointer=ck, telemetry=tel, eval_fn=ev)

Per step: next host batch -> `place(batch)` -> `train_step(state, batch) -> (state, metrics)`.  The
step is dispatched asynchronously; the loop blocks only at logging points (every `log_every` steps,
the first step, eval and checkpoint steps, the last step), so speed is measured as wall time over
the window since the previous logging point (host data work included, eval / checkpoint time
excluded).  The first step's record carries `speed.includes_compile = true`.

Evaluation (`eval_fn(state, step) -> {name: scalar}`) runs every `eval_every` steps and after the
last one (`eval_every=-1`: never); its result is the record's `eval` block and goes into the checkpoint metrics (so
`keep_best` can rank by `eval_loss`).  Checkpoints are written every `checkpoint_every` steps and at
the end (also when `stop_after` ends the run early), with the data iterator's `state()` for exact
resume.  Updates skipped by the non-finite guard are counted in `metrics["skipped"]`, reported in
telemetry and the progress bar, and returned in `FitResult.skipped`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import jax
import numpy as np

from iva_jax.train.telemetry import Telemetry, make_record, validate_record

log = logging.getLogger(__name__)
BLOCK_NAMES = ("moe", "hrm", "quant")


@dataclasses.dataclass
class FitResult:
    """The final state, the last step run, the records logged, the last eval, and skipped updates."""

    state: Any
    step: int
    records: List[Dict[str, Any]]
    last_eval: Dict[str, float]
    skipped: int
    stopped_early: bool


def model_blocks(metrics: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Telemetry blocks from model metrics: `model/.../moe/x` -> {"moe": {".../x": v}} (also hrm, quant)."""
    out: Dict[str, Dict[str, Any]] = {}
    for k, v in metrics.items():
        if not k.startswith("model/"):
            continue
        parts = k.split("/")[1:]
        for name in BLOCK_NAMES:
            if name in parts:
                i = parts.index(name)
                out.setdefault(name, {})["/".join(parts[:i] + parts[i + 1:]) or name] = v
                break
    return out


def _scalars(metrics: Mapping[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and not isinstance(v, str)}


def fit(train_step: Callable, state: Any, batches: Iterator, config: Any, *, start_step: int = 0,
        place: Optional[Callable[[Any], Any]] = None, eval_fn: Optional[Callable[[Any, int], Mapping]] = None,
        checkpointer: Any = None, telemetry: Optional[Telemetry] = None,
        blocks_fn: Callable[[Mapping[str, Any]], Mapping[str, Mapping]] = model_blocks,
        extra_blocks: Optional[Mapping[str, Mapping[str, Any]]] = None, stop_after: Optional[int] = None,
        progress: bool = True, tokens_per_step: Optional[int] = None, desc: str = "train") -> FitResult:
    """Run optimizer steps `start_step + 1 .. config.steps` (or `stop_after`); see the module docstring.

    `config` needs `steps`, `log_every`, `eval_every`, `checkpoint_every` (a TrainConfig).
    `batches` yields host batches; its `state()` (if any) is saved with each checkpoint.
    `extra_blocks` are added to every record (e.g. {"quant": {"base": "int4"}}).
    """
    total = int(config.steps)
    end = total if stop_after is None else min(total, int(stop_after))
    if start_step < 0 or start_step > total:
        raise ValueError(f"start_step={start_step} must be in [0, steps={total}]")
    tokens_per_step = int(tokens_per_step or config.tokens_per_step)
    main = jax.process_index() == 0
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
    records: List[Dict[str, Any]] = []
    last_eval: Dict[str, float] = {}
    skipped, step, stopped_early = 0, start_step, False
    t_last, since = time.perf_counter(), 0
    data_state = getattr(batches, "state", None)
    try:
        for step in range(start_step + 1, end + 1):
            try:
                batch = next(batches)
            except StopIteration:
                log.warning("fit: the data ended after step %d (of %d)", step - 1, total)
                step, stopped_early = step - 1, True
                break
            if place is not None:
                batch = place(batch)
            state, metrics = train_step(state, batch)
            since += 1
            if bar is not None:
                bar.update(1)
            first = step == start_step + 1
            every = config.eval_every  # 0: only after the last step; -1: never
            do_eval = eval_fn is not None and every >= 0 and (step == total or (every > 0 and step % every == 0))
            do_save = checkpointer is not None and (step % config.checkpoint_every == 0 or step == end)
            if not (first or do_eval or do_save or step == end or step % config.log_every == 0):
                continue
            host = jax.device_get(metrics)  # blocks until this step is done
            dt = (time.perf_counter() - t_last) / since
            ev = {k: float(v) for k, v in (eval_fn(state, step) if do_eval else {}).items()}
            if ev:
                last_eval = ev
            blocks = {**dict(blocks_fn(host)), **dict(extra_blocks or {})}
            if ev:
                blocks["eval"] = ev
            kw = dict(tokens=tokens_per_step, step_time_s=dt, blocks=blocks,
                      speed_extra={"includes_compile": True} if first else None)
            rec = telemetry.log(step, host, **kw) if telemetry is not None else make_record(step, host, **kw)
            validate_record(rec)
            records.append(rec)
            n_skip = int(host.get("skipped", 0))
            if n_skip > skipped:
                log.warning("step %d: %d non-finite update(s) skipped so far", step, n_skip)
            skipped = n_skip
            if bar is not None:
                post = {"loss": f"{rec['quality']['loss']:.4f}" if rec["quality"]["loss"] is not None else "nan",
                        "tok/s": f"{rec['speed']['tokens_per_sec']:.4g}"}
                if skipped:
                    post["skipped"] = skipped
                if ev.get("eval_ppl") is not None:
                    post["eval_ppl"] = f"{ev['eval_ppl']:.4g}"
                bar.set_postfix(post, refresh=False)
            if do_save:
                checkpointer.save(step, state, data_state=data_state() if data_state else None,
                                  metrics={**_scalars(host), **ev})
            t_last, since = time.perf_counter(), 0
        stopped_early = stopped_early or end < total
    finally:
        if bar is not None:
            bar.close()
        if checkpointer is not None:
            checkpointer.wait()
    return FitResult(state=state, step=step, records=records, last_eval=last_eval, skipped=skipped,
                     stopped_early=stopped_early)


__all__ = ["fit", "FitResult", "model_blocks"]
