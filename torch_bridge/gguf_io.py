"""Read GGUF files (llama.cpp format) into HF-named float32 tensors plus an HF-style config dict.

Quantized tensors (Q4_0/Q4_1/Q8_0/K-quants...) are dequantized with the `gguf` package.  llama.cpp
stores q/k projections of the `llama` architecture permuted for its interleaved RoPE; they are
permuted back to HF's rotate-half layout here, as transformers' GGUF loader does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

# GGUF architecture -> HF model_type
ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}

_NAMES: Tuple[Tuple[str, str], ...] = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{}.self_attn.q_proj.{}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{}.self_attn.k_proj.{}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{}.self_attn.v_proj.{}"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", "model.layers.{}.self_attn.o_proj.{}"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", "model.layers.{}.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", "model.layers.{}.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{}.mlp.down_proj.weight"),
)
_COMPILED = [(re.compile(f"^{p}$"), t) for p, t in _NAMES]


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | Path) -> Tuple[Dict[str, Any], List[str], Callable[[str], np.ndarray]]:
    """(HF-style config dict, HF tensor names, getter returning float32 arrays) for a GGUF file."""
    import gguf  # numpy-only dependency

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    reader = gguf.GGUFReader(str(p))
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r} in {p.name}; supported: {sorted(ARCHS)}")
    a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads, kv = int(a("attention.head_count")), int(a("attention.head_count_kv", a("attention.head_count")))
    hidden = int(a("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(a("vocab_size", len(tokens) if tokens is not None else 0))
    names = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{p.name}: GGUF rope_freqs (llama3.1-style rope scaling) is not supported")
    hf: Dict[str, Any] = {
        "model_type": ARCHS[arch], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")), "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": int(a("attention.key_length", hidden // heads)),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(a("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "attention_bias": f"blk.0.attn_q.bias" in names,
    }
    if ARCHS[arch] == "qwen2":
        hf.pop("attention_bias")
    rot = a("rope.dimension_count")
    if rot is not None and int(rot) != hf["head_dim"]:
        hf["partial_rotary_factor"] = int(rot) / hf["head_dim"]
    stype, sfactor = a("rope.scaling.type"), a("rope.scaling.factor")
    if stype not in (None, "none") and sfactor not in (None, 1.0):
        rs = {"rope_type": stype, "factor": float(sfactor)}
        orig = a("rope.scaling.original_context_length")
        if orig is not None:
            rs["original_max_position_embeddings"] = int(orig)
        hf["rope_scaling"] = rs
    window = a("attention.sliding_window")
    if window:
        hf["sliding_window"] = int(window)
        hf["use_sliding_window"] = True

    mapping: Dict[str, str] = {}
    unknown = []
    for gname in names:
        for pat, tmpl in _COMPILED:
            m = pat.match(gname)
            if m:
                mapping[tmpl.format(*m.groups())] = gname
                break
        else:
            unknown.append(gname)
    permute = ARCHS[arch] in ("llama", "mistral")

    def get(hf_name: str) -> np.ndarray:
        if hf_name in mapping:
            t = names[mapping[hf_name]]
        else:
            t = names[hf_name]  # unknown GGUF tensors are exposed under their own name
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, heads)
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, kv)
        return w

    return hf, list(mapping) + unknown, get


def gguf_tokenizer_source(path: str | Path) -> Tuple[str, str]:
    """(directory, file name) for transformers' `from_pretrained(dir, gguf_file=name)`."""
    p = Path(path)
    return str(p.parent), p.name
