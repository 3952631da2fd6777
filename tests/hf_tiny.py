"""Tiny random Hugging Face models for parity tests (built from transformers configs, no hub)."""

from __future__ import annotations

import numpy as np

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_hf(family: str, out_dir, seed: int = 0, std: float = 0.15, **overrides):
    """A random fp32 HF causal LM of `family`, saved (safetensors) to out_dir; returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(family, **{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)  # larger than the default init so differences show in the logits
    model.save_pretrained(str(out_dir))
    return model


def hf_logits(model, ids: np.ndarray, attention_mask=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()
