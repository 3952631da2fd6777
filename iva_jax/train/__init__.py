"""Training stack: config, optax recipes, the jitted train step, orbax checkpoints, data, telemetry, LoRA.

Submodules (imported on first use, so `import iva_jax.train.adam_atan2` stays light).  Remat policy
names live in `iva_jax.layers.remat` (the decoder applies them); `TrainConfig.remat` overrides the
model config's choice.
  config      TrainConfig, DataConfig, load_config (YAML + key=value overrides)
  optim       make_schedule, make_optimizer (guard + health + clip + adamw/adam_atan2/lion + plateau)
  step        TrainState, init_train_state, make_train_step, make_eval_step, evaluate
  checkpoint  Checkpointer (orbax), CheckpointMismatchError, CheckpointCorruptError
  data        PackedBatches, ByteTokenizer, default_corpus_path
  telemetry   Telemetry (JSONL, optional TensorBoard), make_record, validate_record
  lora        LoRAConfig, init_lora, lora_apply, merge_lora
  eval        perplexity, distinct_n, repetition_rate
  tiny        TinyLM (a tiny conforming model for tests and smoke runs)
  loop        fit (the loop: telemetry, eval, checkpoints, progress bar), FitResult
  sft         SFTConfig, run_sft (supervised fine-tuning of the decoder, full or LoRA)
"""

import importlib

_EXPORTS = {
    "TrainConfig": "config", "DataConfig": "config", "load_config": "config",
    "fit": "loop", "FitResult": "loop", "SFTConfig": "sft", "run_sft": "sft",
    "make_schedule": "optim", "make_optimizer": "optim", "lr_schedule": "optim",
    "TrainState": "step", "init_train_state": "step", "make_train_step": "step", "make_eval_step": "step",
    "evaluate": "step",
    "Checkpointer": "checkpoint", "CheckpointMismatchError": "checkpoint", "CheckpointCorruptError": "checkpoint",
    "PackedBatches": "data", "ByteTokenizer": "data", "default_corpus_path": "data",
    "Telemetry": "telemetry",
    "LoRAConfig": "lora", "init_lora": "lora", "lora_apply": "lora", "merge_lora": "lora",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"iva_jax.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'iva_jax.train' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
