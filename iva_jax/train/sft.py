"""Supervised fine-tuning of the decoder: `SFTConfig` and `run_sft` (what experiments/train_sft.py calls).

`run_sft(cfg, model_config, params, tokenizer)` builds the mesh, the train state (full fine-tuning,
or LoRA adapters over a frozen base), the optax chain, the packed data stream, orbax checkpoints
(resuming from the latest one when `resume`), the eval function (perplexity on held-out batches,
distinct-2 / repetition rate of greedy generations) and telemetry, and runs `loop.fit`.  Loading
a model from disk and exporting to Hugging Face live in `torch_bridge` (the script joins them).

LoRA runs write `<checkpoint_dir>/lora.yaml` (the adapter config and where the base comes from), so
a checkpoint that holds only adapters can be merged and exported later
(`python -m torch_bridge.orbax_to_torch`).  A randomly initialized base is saved once under
`<checkpoint_dir>/base` for the same reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import NamedSharding, PartitionSpec

from iva_jax.config import ModelConfig, check, check_positive
from iva_jax.parallel import batch_sharding, put_batch, shard_params, tree_shardings, unbox
from iva_jax.train.config import DTYPES, TrainConfig
from iva_jax.train.lora import LoRAConfig, init_lora, lora_apply, lora_param_count, merge_lora

log = logging.getLogger(__name__)
LORA_FILE = "lora.yaml"
BASE_DIR = "base"


@dataclasses.dataclass(frozen=True)
class SFTConfig(TrainConfig):
    """A TrainConfig plus what SFT adds: the model source, tokenizer, LoRA, generation eval and export."""

    # "smollm2-135m" (embedded GGUF) | HF directory | .gguf | orbax checkpoint dir | ModelConfig YAML (random init)
    model: str = "smollm2-135m"
    tokenizer: Optional[str] = None  # None: the model's own; "bytes": iva_jax.train.data.ByteTokenizer
    model_overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig fields
    lora: Optional[LoRAConfig] = None  # None: full fine-tuning
    base_quant: Optional[str] = None  # "int4" / "int8": QLoRA, the frozen base quantized (iva_jax.quant)
    base_quant_group_size: int = 64
    gen_prompt_len: int = 16  # tokens of each held-out row used as a generation prompt
    resume: bool = True  # continue from the latest checkpoint in checkpoint_dir when there is one
    export_dir: Optional[str] = None  # Hugging Face directory written at the end (LoRA merged)
    export_dtype: Optional[str] = None  # None: the master weights' dtype

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.model, str) and bool(self.model), "model", self.model, "must name a model source")
        check(isinstance(self.model_overrides, dict), "model_overrides", self.model_overrides, "must be a mapping")
        bad = sorted(set(self.model_overrides) - set(ModelConfig.field_names()))
        check(not bad, "model_overrides", bad,
              f"unknown ModelConfig keys; valid keys: {sorted(ModelConfig.field_names())}")
        check(self.lora is None or isinstance(self.lora, LoRAConfig), "lora", self.lora, "must be a LoRAConfig or null")
        check(self.base_quant in (None, "int4", "int8"), "base_quant", self.base_quant,
              "must be null, 'int4' or 'int8'")
        check(self.base_quant is None or self.lora is not None, "base_quant", self.base_quant,
              "a quantized base is frozen: it needs lora (QLoRA)")
        check(self.base_quant_group_size in (32, 64, 128, 256), "base_quant_group_size", self.base_quant_group_size,
              "must be one of [32, 64, 128, 256]")
        check_positive(self, "gen_prompt_len")
        check(self.export_dtype is None or self.export_dtype in DTYPES, "export_dtype", self.export_dtype,
              f"must be one of {list(DTYPES)} or null")


def sft_model_config(model_config: ModelConfig, cfg: SFTConfig) -> ModelConfig:
    """The decoder config a run trains: compute / master dtypes and remat from `cfg`, then `model_overrides`."""
    changes: Dict[str, Any] = {"dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype}
    if cfg.remat is not None:
        changes["remat"] = cfg.remat
    changes.update(cfg.model_overrides)
    return model_config.replace(**changes)


def train_deterministic(model_config: ModelConfig) -> Optional[bool]:
    """False (training mode) when the decoder's MoE router behaves differently in training (jitter noise,
    Sinkhorn selection, the bias-balanced router's bias update); None (the model's default) otherwise."""
    moe = getattr(model_config, "moe", None)
    if moe is not None and (moe.jitter_noise > 0 or moe.router in ("bias_balanced", "sinkhorn")):
        return False
    return None


def tokenizer_vocab(tokenizer: Any) -> int:
    """Number of ids a tokenizer can emit (`len(tok)` for HF tokenizers, else `vocab_size`)."""
    try:
        return int(len(tokenizer))
    except TypeError:
        return int(tokenizer.vocab_size)


def dequantize_leaf(path: Any, leaf: Any) -> Any:
    """The LoRA merge hook for a quantized base: a quantized kernel as float32, anything else unchanged."""
    return leaf.dequantize(jnp.float32) if hasattr(leaf, "dequantize") else leaf


def quantize_base(model, params: Any, precision: str, group_size: int) -> Any:
    """The frozen QLoRA base: every projection kernel quantized (iva_jax.quant, weight-only, group-wise)."""
    from iva_jax.quant import quantize

    return quantize(model, params, precision, group_size=group_size)[1]


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def generation_prompts(batches: List[Dict[str, np.ndarray]], n: int, length: int) -> Optional[np.ndarray]:
    """[n', length] prompts: the first `length` tokens of held-out rows whose first segment is that long."""
    rows = []
    for b in batches:
        for ids, seg in zip(b["input_ids"], b["segment_ids"]):
            if len(rows) < n and seg[0] != 0 and np.all(seg[:length] == seg[0]) and len(ids) > length:
                rows.append(ids[:length])
    return np.stack(rows).astype(np.int32) if rows else None


def trim_generations(tokens: np.ndarray, eos: Optional[int]) -> List[List[int]]:
    """Token lists cut before the first EOS."""
    out = []
    for row in np.asarray(tokens).tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        out.append(row)
    return out


def make_sft_eval(model, apply_fn: Callable, cfg: SFTConfig, tokenizer: Any, *, mesh, state_shardings,
                  gen_params: Callable[[Any], Any]) -> Callable:
    """`eval_fn(state, step)`: eval loss / ppl on held-out packed batches, plus distinct-2, rep-4 and length
    of greedy generations (`gen_samples` prompts, `gen_max_new_tokens` new tokens)."""
    from iva_jax.inference import generate
    from iva_jax.train.data import batches_from_config
    from iva_jax.train.eval import generation_metrics
    from iva_jax.train.step import evaluate, make_eval_step

    eval_batches = list(itertools.islice(batches_from_config(cfg, tokenizer, "eval", loop=False), cfg.eval_batches))
    if not eval_batches:
        raise ValueError("no held-out documents for evaluation: set data.eval_paths or data.eval_fraction > 0 "
                         f"(eval_fraction={cfg.data.eval_fraction})")
    eval_step = make_eval_step(apply_fn, cfg, mesh=mesh, state_shardings=state_shardings)
    bsh = batch_sharding(mesh, batch_size=cfg.batch_size)
    placed = [put_batch(b, bsh) for b in eval_batches]
    prompts = generation_prompts(eval_batches, cfg.gen_samples, min(cfg.gen_prompt_len, cfg.seq_len - 1))
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and model.config.eos_token_id:
        eos = model.config.eos_token_id[0]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = eos if pad is None else pad

    def eval_fn(state, step: int) -> Dict[str, float]:
        out = evaluate(eval_step, state, placed)
        if cfg.gen_samples > 0 and prompts is not None:
            toks = generate(model, gen_params(state), prompts, cfg.gen_max_new_tokens,
                            eos_token_id=eos, pad_token_id=pad)
            out.update(generation_metrics(trim_generations(jax.device_get(toks), eos)))
        return out

    return eval_fn


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SFTResult:
    """What `run_sft` returns: the model, final state, the fit result and the step it resumed from."""

    model: Any
    state: Any
    fit: Any
    config: SFTConfig
    resumed_from: int
    trainable_params: int

    def full_params(self) -> Any:
        """The trained decoder params as float host arrays (LoRA merged into the base, a quantized base dequantized)."""
        if self.config.lora is None:
            return jax.device_get(self.state.params)
        lcfg = self.config.lora

        def merged(base, adapters):
            out = merge_lora(base, adapters, lcfg, dequantize_leaf)
            return jax.tree_util.tree_map(lambda x: dequantize_leaf(None, x), out,
                                          is_leaf=lambda x: hasattr(x, "dequantize"))
        return jax.device_get(jax.jit(merged)(self.state.frozen, self.state.params))


def _write_lora_file(directory: Path, cfg: SFTConfig, base: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    info = {"lora": cfg.lora.to_dict(), "base": base, "base_quant": cfg.base_quant,
            "base_quant_group_size": cfg.base_quant_group_size}
    (directory / LORA_FILE).write_text(yaml.safe_dump(info, sort_keys=False))


def read_lora_file(directory: str | Path) -> Optional[Dict[str, Any]]:
    """{"lora": LoRAConfig, "base": source, "base_quant": None | "int4" | "int8", "base_quant_group_size"} of a
    LoRA run's checkpoint directory (None if it is not a LoRA run)."""
    p = Path(directory) / LORA_FILE
    if not p.exists():
        return None
    raw = yaml.safe_load(p.read_text()) or {}
    return {"lora": LoRAConfig.from_dict(raw.get("lora") or {}), "base": raw.get("base"),
            "base_quant": raw.get("base_quant"), "base_quant_group_size": int(raw.get("base_quant_group_size") or 64)}


# settings that may change between a run and its resumption without changing what is trained
RESUME_SAFE = ("log_every", "eval_every", "eval_batches", "gen_samples", "gen_max_new_tokens", "gen_prompt_len",
               "checkpoint_every", "keep", "keep_best", "best_metric", "best_mode", "async_checkpoint",
               "telemetry_path", "tensorboard_dir", "export_dir", "export_dtype", "resume", "checkpoint_dir", "mesh")


def resume_changes(meta: Dict[str, Any], cfg: SFTConfig) -> List[str]:
    """Keys (outside `RESUME_SAFE`) whose value differs from the checkpoint's saved train config."""
    saved = meta.get("train_config")
    if not saved:
        return []
    old, new = yaml.safe_load(saved) or {}, yaml.safe_load(cfg.to_yaml())
    return sorted(k for k in set(old) | set(new) if k not in RESUME_SAFE and old.get(k) != new.get(k))


def run_sft(cfg: SFTConfig, model_config: ModelConfig, params: Any, tokenizer: Any, *,
            base_source: Optional[str] = None, stop_after: Optional[int] = None, progress: bool = True) -> SFTResult:
    """Train `model_config` from `params` (None: random init from `cfg.seed`) on `cfg.data`; see the module doc.

    `base_source` names where the base weights come from (recorded for LoRA runs; None for a random
    base, which is then saved under the checkpoint directory).  `stop_after` ends the run early
    (after checkpointing) without changing the schedule, as an interrupted run would.
    """
    from iva_jax.models.transformer import Transformer
    from iva_jax.train.checkpoint import Checkpointer, save_params, shape_differences
    from iva_jax.train.data import batches_from_config
    from iva_jax.train.loop import fit
    from iva_jax.train.step import (create_train_state, init_train_state, make_train_step, make_tx_and_schedule,
                                    model_state_of)
    from iva_jax.train.telemetry import Telemetry

    mc = sft_model_config(model_config, cfg)
    vocab = tokenizer_vocab(tokenizer)
    if vocab > mc.vocab_size:
        raise ValueError(f"the tokenizer emits {vocab} ids but the model's vocab_size is {mc.vocab_size}")
    mesh = cfg.mesh.build(allow_subset=True)
    model = Transformer(mc)
    k_init, k_lora, k_state = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    abstract_vars = jax.eval_shape(model.init, k_init, jnp.zeros((1, 2), jnp.int32))
    logical = abstract_vars["params"]
    model_state = None  # non-parameter collections (an MoE bias router's expert bias), when the model has any
    if model_state_of(abstract_vars) is not None:
        model_state = jax.jit(lambda k: model_state_of(model.init(k, jnp.zeros((1, 2), jnp.int32))))(k_init)
    if params is not None:
        diff = shape_differences(params, unbox(logical))
        if diff:
            raise ValueError(f"the loaded params do not fit the model config ({len(diff)} leaves differ; "
                             "check model_overrides):\n" + "\n".join(diff[:20]))
    param_sh = tree_shardings(logical, mesh)
    tx, sched = make_tx_and_schedule(cfg)
    pdt = jnp.dtype(cfg.param_dtype)

    def cast(tree):
        return jax.tree_util.tree_map(lambda x: x.astype(pdt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    ckdir = Path(cfg.checkpoint_dir).absolute() if cfg.checkpoint_dir else None
    extra_blocks = {}
    if cfg.lora is None:
        apply_fn = model.apply
        if params is None:
            state, sh = init_train_state(lambda k: model.init(k, jnp.zeros((1, 2), jnp.int32))["params"], tx, k_state,
                                         mesh=mesh, param_dtype=cfg.param_dtype, model_state=model_state)
        else:
            state, sh = create_train_state(params, tx, k_state, mesh=mesh, logical=logical,
                                           param_dtype=cfg.param_dtype, model_state=model_state)

        def gen_params(st):  # with the model's state (e.g. moe_stats) when it has one
            return {"params": st.params, **st.model_state} if st.model_state else st.params
    else:
        if params is None:
            base = jax.jit(lambda k: cast(unbox(model.init(k, jnp.zeros((1, 2), jnp.int32))["params"])),
                           out_shardings=param_sh)(k_init)
            if ckdir is not None and not (ckdir / BASE_DIR).exists():
                save_params(ckdir / BASE_DIR, base, model_config=mc)
            base_source = str(ckdir / BASE_DIR) if ckdir is not None else None
        else:
            base = shard_params(cast(params), param_sh)
        dequant, frozen_sh = None, param_sh
        if cfg.base_quant is not None:  # QLoRA: the quantized base is replicated (it is small by design)
            base = quantize_base(model, base, cfg.base_quant, cfg.base_quant_group_size)
            frozen_sh = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec()), base)
            base = jax.device_put(base, frozen_sh)
            dequant = dequantize_leaf
            from iva_jax.quant import params_nbytes
            extra_blocks["quant"] = {"base_bits": 4 if cfg.base_quant == "int4" else 8,
                                     "group_size": cfg.base_quant_group_size, "base_gb": params_nbytes(base) / 1e9}
        adapters = init_lora(logical, cfg.lora, k_lora)
        apply_fn = lora_apply(model.apply, cfg.lora, dequant)
        state, sh = create_train_state(adapters, tx, k_state, mesh=mesh, logical=adapters,
                                       param_dtype=cfg.param_dtype, frozen=base, frozen_shardings=frozen_sh,
                                       model_state=model_state)
        if ckdir is not None and jax.process_index() == 0:
            if base_source is None:
                log.warning("LoRA run without a base source: orbax_to_torch will need --base")
            _write_lora_file(ckdir, cfg, base_source or "")
        merge = jax.jit(lambda b, a: merge_lora(b, a, cfg.lora, dequant))

        def gen_params(st):
            merged = merge(st.frozen, st.params)
            return {"params": merged, **st.model_state} if st.model_state else merged
    n_train = lora_param_count(state.params)

    checkpointer = None
    if ckdir is not None:
        checkpointer = Checkpointer(ckdir, keep=cfg.keep, keep_best=cfg.keep_best, best_metric=cfg.best_metric,
                                    best_mode=cfg.best_mode, save_every=cfg.checkpoint_every,
                                    async_save=cfg.async_checkpoint, train_config=cfg, model_config=mc)
        if hasattr(tokenizer, "save_pretrained") and not (ckdir / "tokenizer").exists() and jax.process_index() == 0:
            tokenizer.save_pretrained(str(ckdir / "tokenizer"))
    data = batches_from_config(cfg, tokenizer, "train")
    start = 0
    if checkpointer is not None and cfg.resume and checkpointer.latest_step() is not None:
        restored = checkpointer.restore(state, shardings=sh)
        state, start = restored.state, restored.step
        if restored.data_state:
            data.load_state(restored.data_state)
        log.warning("resumed from %s step %d", ckdir, start)
        changed = resume_changes(restored.meta, cfg)
        if changed:
            log.warning("resuming with changed settings %s: the run will differ from an uninterrupted one", changed)
    train_step = make_train_step(apply_fn, tx, cfg, schedule=sched, mesh=mesh, state_shardings=sh,
                                 deterministic=train_deterministic(mc))
    eval_fn = None
    if cfg.eval_every >= 0:
        eval_fn = make_sft_eval(model, apply_fn, cfg, tokenizer, mesh=mesh, state_shardings=sh, gen_params=gen_params)
    bsh = batch_sharding(mesh, batch_size=cfg.batch_size)
    telemetry = Telemetry(cfg.telemetry_path, cfg.tensorboard_dir)
    try:
        result = fit(train_step, state, data, cfg, start_step=start, place=lambda b: put_batch(b, bsh),
                     eval_fn=eval_fn, checkpointer=checkpointer, telemetry=telemetry, extra_blocks=extra_blocks,
                     stop_after=stop_after, progress=progress, desc="sft")
    finally:
        telemetry.close()
        if checkpointer is not None:
            checkpointer.close()
    return SFTResult(model=model, state=result.state, fit=result, config=cfg, resumed_from=start,
                     trainable_params=n_train)


__all__ = ["SFTConfig", "SFTResult", "run_sft", "train_deterministic", "sft_model_config", "make_sft_eval", "read_lora_file",
           "generation_prompts", "trim_generations", "tokenizer_vocab", "quantize_base", "dequantize_leaf"]
