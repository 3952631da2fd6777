"""Orbax checkpoints of a TrainState: async, atomic, latest-N + best-K, exact resume, any-mesh restore.

Layout of `directory/<step>/`: `state` (step, params, opt_state, rng, and `model_state` when the state
has one, e.g. an MoE router's expert bias: an orbax pytree as a plain nested dict), `data` (JSON: the data iterator's position, for exact resume), `meta` (JSON: train / model
config YAML, metrics, wall time).  `directory/train_config.yaml` and `model_config.yaml` are written
beside the steps for people.  Frozen weights (`TrainState.frozen`, e.g. a LoRA base) are never saved:
they come back from the restore target.

Writes are atomic: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a
crash leaves at most a tmp directory, which `Checkpointer` removes (with a warning) when it opens
the directory.  Restore checks the stored shapes against the target first and raises
`CheckpointMismatchError` listing every differing leaf; unreadable data raises `CheckpointCorruptError`.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

try:  # preservation policies (latest-N *and* best-K) arrived in orbax 0.11.x
    from orbax.checkpoint import checkpoint_managers as ocm
    _POLICIES = hasattr(ocm, "LatestN") and hasattr(ocm, "BestN")
except ImportError:  # pragma: no cover - old orbax
    ocm, _POLICIES = None, False

from iva_jax.train.step import TrainState

log = logging.getLogger(__name__)
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into the requested target."""


class CheckpointMismatchError(CheckpointError):
    """Stored leaves differ from the target's in path, shape or dtype (all differences are listed)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files are missing or unreadable."""


class Restored(NamedTuple):
    state: TrainState
    data_state: Optional[Dict[str, Any]]
    meta: Dict[str, Any]
    step: int


def _short(e: Exception, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _fields(state: TrainState) -> Dict[str, Any]:
    """The saved fields of a TrainState (or of its shardings); model_state only when present."""
    out = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
    if getattr(state, "model_state", None) is not None:
        out["model_state"] = state.model_state
    return out


def _payload(state: TrainState) -> Dict[str, Any]:
    return serialization.to_state_dict(_fields(state))


def _flat(tree: Any) -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {"": tree}
    return traverse_util.flatten_dict(tree, sep="/")


def compare_trees(stored: Dict[str, Any], target: Dict[str, Any]) -> list:
    """Lines describing every leaf whose presence, shape or dtype differs (empty when they agree)."""
    s, t = _flat(stored), _flat(target)
    lines = []
    for k in sorted(set(s) | set(t)):
        if k not in t:
            lines.append(f"  {k}: in checkpoint {tuple(s[k].shape)} {s[k].dtype}, not in target")
        elif k not in s:
            lines.append(f"  {k}: missing from checkpoint (target {tuple(np.shape(t[k]))} {t[k].dtype})")
        else:
            ss, ts = tuple(s[k].shape), tuple(np.shape(t[k]))
            sd, td = np.dtype(s[k].dtype), np.dtype(t[k].dtype)
            if ss != ts or sd != td:
                lines.append(f"  {k}: checkpoint {ss} {sd} != target {ts} {td}")
    return lines


def shape_differences(tree: Any, reference: Any) -> list:
    """Lines naming every leaf path whose shape differs between two param trees, or that only one has."""
    def shapes(t):
        return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(t)}
    have, want = shapes(tree), shapes(reference)
    return [f"  {k}: {have.get(k, 'missing')} != expected {want.get(k, 'absent')}"
            for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]


class Checkpointer:
    """Periodic (async) saves keeping the latest `keep` and the best `keep_best` by `best_metric`."""

    def __init__(self, directory: str | Path, *, keep: int = 3, keep_best: int = 0, best_metric: str = "eval_loss",
                 best_mode: str = "min", save_every: int = 1, async_save: bool = True,
                 train_config: Any = None, model_config: Any = None) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode={best_mode!r} must be 'min' or 'max'")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.save_every, self.best_metric, self.best_mode = save_every, best_metric, best_mode
        self.train_config, self.model_config = train_config, model_config
        self.removed_tmp = self._remove_partial_writes()
        worst = float("inf") if best_mode == "min" else float("-inf")

        def metric(m) -> float:  # checkpoints saved without the metric rank last
            return float(m[best_metric]) if m and best_metric in m else worst

        common = dict(enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True,
                      best_fn=metric if keep_best > 0 else None, best_mode=best_mode)  # best_fn: metrics persist
        if _POLICIES:
            policies = [ocm.LatestN(n=keep)]
            if keep_best > 0:
                policies.append(ocm.BestN(get_metric_fn=metric, reverse=best_mode == "min", n=keep_best,
                                          keep_checkpoints_without_metrics=False))
            options = ocp.CheckpointManagerOptions(preservation_policy=ocm.AnyPreservationPolicy(policies), **common)
        else:  # pragma: no cover - old orbax: max_to_keep only (the best `keep` when keep_best > 0)
            log.warning("checkpoint: this orbax has no preservation policies; keeping %d %s", keep,
                        "best" if keep_best else "latest")
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, **common)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._wrote_configs = False

    # -- housekeeping ------------------------------------------------------------------------------
    def _remove_partial_writes(self) -> list:
        """Delete tmp directories a crashed save left behind; return their names."""
        removed = []
        if jax.process_index() != 0:
            return removed
        for p in sorted(self.directory.iterdir()):
            if p.is_dir() and TMP_MARKER in p.name:
                log.warning("checkpoint: removing incomplete write %s (a save was interrupted)", p)
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def _write_configs(self) -> None:
        if self._wrote_configs or jax.process_index() != 0:
            return
        for name, cfg in (("train_config.yaml", self.train_config), ("model_config.yaml", self.model_config)):
            if cfg is not None:
                (self.directory / name).write_text(cfg.to_yaml() if hasattr(cfg, "to_yaml") else str(cfg))
        self._wrote_configs = True

    # -- queries -------------------------------------------------------------------------------------
    def all_steps(self) -> list:
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> Optional[int]:
        """The kept step with the best `best_metric` (None when no saved step has it)."""
        scored = []
        for s in self.all_steps():
            m = self._mgr.metrics(s)
            if not m:  # metrics are persisted only when keep_best > 0; fall back to the meta item
                m = self._read_json(s, "meta").get("metrics", {})
            if m and self.best_metric in m:
                scored.append((float(m[self.best_metric]), s))
        if not scored:
            return None
        return (min if self.best_mode == "min" else max)(scored)[1]

    def _read_json(self, step: int, item: str) -> Dict[str, Any]:
        try:
            return self._mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item] or {}
        except Exception:  # noqa: BLE001 - a missing / unreadable item reads as empty
            return {}

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.save_every == 0

    # -- save / restore ------------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, *, data_state: Optional[Dict[str, Any]] = None,
             metrics: Optional[Dict[str, Any]] = None, force: bool = False) -> bool:
        """Start saving `state` as `step` (returns once arrays are copied to host; `wait()` to finish)."""
        if step in self._mgr.all_steps():
            return False
        metrics = {k: float(v) for k, v in (metrics or {}).items() if np.ndim(v) == 0}
        meta = {"step": int(step), "time": time.time(), "metrics": metrics,
                "train_config": self.train_config.to_yaml() if self.train_config is not None else None,
                "model_config": self.model_config.to_yaml() if self.model_config is not None else None}
        args = ocp.args.Composite(state=ocp.args.StandardSave(_payload(state)),
                                  data=ocp.args.JsonSave(data_state or {}), meta=ocp.args.JsonSave(meta))
        saved = self._mgr.save(step, args=args, metrics=metrics, force=True)
        self._write_configs()
        return bool(saved)

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stored_shapes(self, step: int) -> Dict[str, Any]:
        """The stored state tree of `step` as nested dict of array metadata (shape, dtype)."""
        try:
            md = self._mgr.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types here
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is corrupted or unreadable "
                                         f"(cannot read its metadata): {_short(e)}") from e
        tree = getattr(md, "tree", md)
        if tree is None:
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is corrupted or unreadable "
                                         f"(its state metadata is missing)")
        return tree

    def restore_params(self, step: Optional[int] = None, target: Any = None, shardings: Any = None) -> Any:
        """Only the params of `step` (default latest), without reading the optimizer state.

        `target`: a param tree (arrays or ShapeDtypeStructs) to check shapes against and restore into;
        default: the stored shapes and dtypes on the first local device (what export / conversion wants).
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}; have {self.all_steps()}")
        stored = self.stored_shapes(step).get("params")
        if stored is None:
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} holds no params")
        if target is None:
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                                              stored)
        else:
            sd = serialization.to_state_dict(target)
            sh = (serialization.to_state_dict(shardings) if shardings is not None
                  else jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), sd))
            abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), sd, sh)
            diff = compare_trees(stored, abstract)
            if diff:
                raise CheckpointMismatchError(f"params of checkpoint step {step} in {self.directory} do not match "
                                              f"the target ({len(diff)} differing leaves):\n" + "\n".join(diff))
        item = {"params": abstract}
        try:
            with ocp.PyTreeCheckpointer() as c:
                out = c.restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                    item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is corrupted or unreadable: "
                                         f"{_short(e)}") from e
        params = out["params"]
        return serialization.from_state_dict(target, params) if target is not None else params

    def restore(self, target: TrainState, step: Optional[int] = None, *, shardings: Any = None) -> Restored:
        """Restore `step` (default latest) into the structure, shapes and shardings of `target`.

        `target` may hold arrays or `jax.ShapeDtypeStruct`s; `shardings` (a TrainState of shardings,
        e.g. from `init_train_state` on another mesh) overrides where the arrays land.
        """
        self.wait()
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory}; have {self.all_steps()}")
        target_sd = _payload(target)
        if shardings is not None:
            shard_sd = serialization.to_state_dict(_fields(shardings))
            if ("model_state" in shard_sd) != ("model_state" in target_sd):
                raise ValueError("restore: target and shardings disagree on model_state (one of them is None)")
        else:
            shard_sd = jax.tree_util.tree_map(lambda x: getattr(x, "sharding", None), target_sd)
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), target_sd, shard_sd)
        diff = compare_trees(self.stored_shapes(step), abstract)
        if diff:
            hint = ""
            if any(line.startswith("  model_state") for line in diff):
                hint = ("\n(model_state: the checkpoint and the target disagree on the model's non-parameter state, "
                        "e.g. an MoE router's expert bias; a checkpoint saved without it cannot restore it)")
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not match the target state "
                f"({len(diff)} differing leaves):\n" + "\n".join(diff) + hint)
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is corrupted or unreadable: "
                                         f"{_short(e)}") from e
        sd = out["state"]
        restored = serialization.from_state_dict(_fields(target), sd)
        state = TrainState(step=restored["step"], params=restored["params"], opt_state=restored["opt_state"],
                           rng=restored["rng"], frozen=target.frozen, model_state=restored.get("model_state"))
        return Restored(state, out.get("data") or None, out.get("meta") or {}, int(step))


def save_params(directory: str | Path, params: Any, *, model_config: Any = None, step: int = 0,
                metrics: Optional[Dict[str, Any]] = None) -> Path:
    """Write a params-only checkpoint (no optimizer state) that `Checkpointer.restore_params` reads.

    Used for converted models (`torch_bridge.hf_to_orbax`) and a LoRA run's random base; the model
    config goes to `directory/model_config.yaml`.
    """
    state = TrainState(step=np.asarray(step, np.int32), params=params, opt_state={},
                       rng=np.zeros(2, np.uint32))
    with Checkpointer(directory, keep=1, async_save=False, model_config=model_config) as ck:
        if step in ck.all_steps():
            raise FileExistsError(f"{ck.directory} already holds step {step}")
        ck.save(step, state, metrics=metrics)
    return Path(directory)
