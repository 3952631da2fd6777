"""Configuration dataclasses: frozen, validated at construction, loaded from and saved to YAML.

`ConfigBase` gives every config the same behaviour: `from_dict` rejects unknown keys (listing the
valid ones), nested configs are rebuilt from nested dicts, `to_dict`/`to_yaml`/`from_yaml` round
trip, and `replace(**changes)` re-validates.  Subsystem configs (MoE, SSM, HRM, train, RL, quant)
live beside their code and subclass `ConfigBase`; `ModelConfig` is the decoder's single source of
truth for shapes.

Nested subsystem configs (`ModelConfig.moe: MoEConfig`, `ModelConfig.ssm: SSMConfig`) are named in
annotations only: `iva_jax.moe` / `iva_jax.ssm` import this module, so this module cannot import them at
load time.  A class lists such names in `_nested_types()`, which imports them when first needed
(`from_dict` resolves the annotations with it; `ModelConfig.__post_init__` turns mappings into them).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Tuple, Type, TypeVar

import numpy as np
import yaml

if TYPE_CHECKING:  # only for readers and linters: resolved lazily by ModelConfig._nested_types
    from iva_jax.moe.config import MoEConfig
    from iva_jax.ssm.config import SSMConfig

T = TypeVar("T", bound="ConfigBase")

_DTYPES = ("float32", "bfloat16", "float16")


def check(cond: bool, field: str, value: Any, why: str) -> None:
    """Raise ValueError naming `field` and `value` unless `cond` holds."""
    if not cond:
        raise ValueError(f"invalid config: {field}={value!r}: {why}")


def check_positive(obj: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(obj, f)
        check(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, f, v, "must be > 0")


def check_choice(obj: Any, field: str, choices: Sequence[Any]) -> None:
    v = getattr(obj, field)
    check(v in choices, field, v, f"must be one of {list(choices)}")


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Frozen dataclass with strict dict/YAML round trips. Subclasses validate in `validate()`."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        pass

    @classmethod
    def _nested_types(cls) -> dict:
        """Names used in field annotations that live in modules importing this one (resolved lazily)."""
        return {}

    # ---- dict / yaml -------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: Type[T], d: Mapping[str, Any]) -> T:
        """Build from a mapping; unknown keys raise ValueError listing the valid ones."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__}.from_dict expects a mapping, got {type(d).__name__}")
        valid = cls.field_names()
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(valid)}")
        hints = typing.get_type_hints(cls, localns=cls._nested_types())
        kwargs = {}
        for k, v in d.items():
            kwargs[k] = _coerce(hints.get(k), v)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, ConfigBase):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [x.to_dict() if isinstance(x, ConfigBase) else (list(x) if isinstance(x, tuple) else x) for x in v]
            elif isinstance(v, dict):
                v = dict(v)
            out[f.name] = v
        return out

    def to_yaml(self, path: Optional[str | Path] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls: Type[T], path_or_text: str | Path, **overrides: Any) -> T:
        """Load from a YAML file path (or YAML text); `overrides` replace keys after loading."""
        p = Path(path_or_text)
        if isinstance(path_or_text, Path) or (len(str(path_or_text)) < 4096 and p.suffix in (".yaml", ".yml")):
            if not p.exists():
                raise FileNotFoundError(f"config file not found: {p}")
            data = yaml.safe_load(p.read_text()) or {}
        else:
            data = yaml.safe_load(str(path_or_text)) or {}
        data.update(overrides)
        return cls.from_dict(data)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)


def _coerce(hint: Any, v: Any) -> Any:
    """Turn YAML values (lists, dicts) into the dataclass field's declared type."""
    if v is None or hint is None:
        return v
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        non_none = [a for a in args if a is not type(None)]
        for a in non_none:
            if isinstance(a, type) and issubclass(a, ConfigBase) and isinstance(v, Mapping):
                return a.from_dict(v)
        if len(non_none) == 1:
            return _coerce(non_none[0], v)
        return v
    if isinstance(hint, type) and issubclass(hint, ConfigBase) and isinstance(v, Mapping):
        return hint.from_dict(v)
    if origin in (tuple, Tuple) and isinstance(v, (list, tuple)):
        inner = args[0] if args else None
        return tuple(_coerce(inner, x) if inner not in (Ellipsis,) else x for x in v)
    if hint is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling(ConfigBase):
    """RoPE scaling as transformers defines it (`rope_scaling` / `rope_parameters` in config.json)."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: Optional[int] = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True

    def validate(self) -> None:
        check_choice(self, "rope_type", ROPE_TYPES)
        check(self.factor > 0, "rope_scaling.factor", self.factor, "must be > 0")
        if self.rope_type == "llama3":
            check(self.original_max_position_embeddings is not None and self.original_max_position_embeddings > 0,
                  "rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings,
                  "llama3 scaling needs it")
            check(self.high_freq_factor > self.low_freq_factor, "rope_scaling.high_freq_factor",
                  self.high_freq_factor, "must exceed low_freq_factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigBase):
    """Decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3 and the MoE families Mixtral / Qwen2-MoE /
    Qwen3-MoE), with heterogeneous layers: each layer's sequence mixer comes from `mixer_types` ("attention"
    or an `iva_jax.ssm` mixer name, hyper-parameters from `ssm`) and its FFN from `moe.moe_layer_mask`
    (MoE there, dense SwiGLU of `intermediate_size` elsewhere).  `layer_kinds()` lists them per layer.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None  # default hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q_proj/k_proj/v_proj (Qwen2; Llama/Qwen3 attention_bias)
    attention_out_bias: bool = False  # bias on o_proj (Llama/Qwen3 attention_bias; not Qwen2)
    mlp_bias: bool = False  # bias on gate/up/down projections (Llama mlp_bias)
    hidden_act: str = "silu"
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: Optional[int] = None  # keys at distance >= window are masked (Mistral)
    # per-layer "full_attention" | "sliding_attention" (Qwen2/Qwen3); None = every layer uses sliding_window
    layer_types: Optional[Tuple[str, ...]] = None
    # per-layer sequence mixer: "attention" or an SSM mixer name (iva_jax.ssm.MIXER_TYPES); None = all attention
    mixer_types: Optional[Tuple[str, ...]] = None
    moe: Optional[MoEConfig] = None  # MoE FFN on the layers moe.moe_layer_mask(L) selects; dense FFN elsewhere
    # how the MoE balancing loss combines layers: "hf" = HF load_balancing_loss_func (f and P averaged over
    # the MoE layers, then E * sum f P); "per_layer" = each layer's own loss, averaged (Switch / GShard /
    # MaxText): it balances every layer, where "hf" lets one layer's overload hide behind another's slack
    moe_aux_loss_layers: str = "hf"
    ssm: Optional[SSMConfig] = None  # SSM mixer hyper-parameters (the mixer type comes from mixer_types)
    n_sink: int = 1  # leading key positions a per-call `attn_sink_bias` applies to (attention sinks)
    max_position_embeddings: int = 4096
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    model_type: str = "llama"  # family tag used by the bridge
    attn_impl: str = "auto"  # "auto" | "xla" | "pallas" : kernels dispatcher choice
    norm_impl: str = "auto"
    mlp_impl: str = "auto"
    # training: the SwiGLU backward reuses the forward's gate/up products (2 fewer matmuls per layer; keeps
    # 2 x tokens x intermediate_size activations; +16% tokens/s on the ~1B H100 step) instead of recomputing
    # them from x (False: the memory-lean choice)
    mlp_save_products: bool = True
    scan_layers: bool = True
    scan_unroll: int = 1  # layers per scan iteration (>= num_hidden_layers: fully unrolled; fastest decode)
    remat: str = "none"  # "none" | "full" | "dots_saveable" | "dots_with_no_batch_dims_saveable"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Tuple[int, ...]] = None
    pad_token_id: Optional[int] = None

    @classmethod
    def _nested_types(cls) -> dict:
        from iva_jax.moe.config import MoEConfig
        from iva_jax.ssm.config import SSMConfig

        return {"MoEConfig": MoEConfig, "SSMConfig": SSMConfig}

    def __post_init__(self) -> None:
        # accept plain mappings for the nested configs and lists for the tuple fields (Python callers)
        for f, type_name in (("moe", "MoEConfig"), ("ssm", "SSMConfig")):
            v = getattr(self, f)
            if isinstance(v, Mapping):
                object.__setattr__(self, f, self._nested_types()[type_name].from_dict(v))
        for f in ("layer_types", "mixer_types", "eos_token_id"):
            v = getattr(self, f)
            if isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        super().__post_init__()

    def validate(self) -> None:
        check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "rope_theta", "rms_norm_eps",
                       "max_position_embeddings")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool), f, v, "must be an integer")
        check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
              self.num_key_value_heads, f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None:
            check(self.hidden_size % self.num_attention_heads == 0, "hidden_size", self.hidden_size,
                  f"must be divisible by num_attention_heads={self.num_attention_heads} when head_dim is unset")
        else:
            check(isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0,
                  "head_dim", self.head_dim, "must be a positive even integer")
        check(0.0 < self.partial_rotary_factor <= 1.0, "partial_rotary_factor", self.partial_rotary_factor,
              "must be in (0, 1]")
        check(self.rotary_dim % 2 == 0, "partial_rotary_factor", self.partial_rotary_factor,
              f"gives an odd rotary dim {self.rotary_dim}")
        if self.sliding_window is not None:
            check(isinstance(self.sliding_window, int) and self.sliding_window > 0, "sliding_window",
                  self.sliding_window, "must be a positive integer or None")
        if self.layer_types is not None:
            check(len(self.layer_types) == self.num_hidden_layers, "layer_types", self.layer_types,
                  f"needs one entry per layer ({self.num_hidden_layers})")
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            check(not bad, "layer_types", bad, "entries must be 'full_attention' or 'sliding_attention'")
            check(self.sliding_window is not None or "sliding_attention" not in self.layer_types,
                  "sliding_window", self.sliding_window, "sliding_attention layers need a sliding_window")
        check_choice(self, "hidden_act", ("silu",))
        check_choice(self, "param_dtype", _DTYPES)
        check_choice(self, "dtype", _DTYPES)
        for f in ("attn_impl", "norm_impl", "mlp_impl"):
            check_choice(self, f, ("auto", "xla", "pallas", "triton", "mosaic"))
        check_choice(self, "remat", ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"))
        check(isinstance(self.mlp_save_products, bool), "mlp_save_products", self.mlp_save_products, "must be a bool")
        check(isinstance(self.scan_unroll, int) and self.scan_unroll >= 1, "scan_unroll", self.scan_unroll,
              "must be a positive integer")
        if self.eos_token_id is not None:
            check(all(isinstance(t, int) and 0 <= t < self.vocab_size for t in self.eos_token_id),
                  "eos_token_id", self.eos_token_id, "ids must be in [0, vocab_size)")
        check(isinstance(self.n_sink, int) and not isinstance(self.n_sink, bool) and self.n_sink >= 0, "n_sink",
              self.n_sink, "must be a non-negative integer")
        check_choice(self, "moe_aux_loss_layers", ("hf", "per_layer"))
        self._validate_layer_pattern()

    def _validate_layer_pattern(self) -> None:
        L = self.num_hidden_layers
        if self.mixer_types is not None:
            from iva_jax.ssm.config import MIXER_TYPES

            check(isinstance(self.mixer_types, tuple) and len(self.mixer_types) == L, "mixer_types",
                  self.mixer_types, f"needs one entry per layer ({L})")
            bad = sorted(set(self.mixer_types) - {"attention", *MIXER_TYPES})
            check(not bad, "mixer_types", bad, f"entries must be 'attention' or an SSM mixer {list(MIXER_TYPES)}")
        ssm_types = sorted(set(self.layer_mixers()) - {"attention"})
        if self.ssm is not None:
            check(isinstance(self.ssm, self._nested_types()["SSMConfig"]), "ssm", type(self.ssm).__name__,
                  "must be an SSMConfig (or a mapping of its fields)")
        if ssm_types:
            check(self.ssm is not None, "ssm", None, f"mixer_types uses SSM mixers {ssm_types}: give an ssm config")
            for t in ssm_types:
                try:
                    if t in ("retnet", "topk_attention"):
                        self.ssm.head_dim(self.hidden_size)
                    elif t == "mamba2":
                        self.ssm.mamba2_heads(self.hidden_size)
                except ValueError as e:
                    raise ValueError(f"invalid config: ssm (for {t} layers): {e}") from None
        if self.moe is not None:
            check(isinstance(self.moe, self._nested_types()["MoEConfig"]), "moe", type(self.moe).__name__,
                  "must be a MoEConfig (or a mapping of its fields)")
            m = self.moe
            if m.moe_layers is not None:
                bad = [i for i in m.moe_layers if i >= L]
                check(not bad, "moe.moe_layers", m.moe_layers, f"indices {bad} >= num_hidden_layers={L}")
            bad = [i for i in m.mlp_only_layers if i >= L]
            check(not bad, "moe.mlp_only_layers", m.mlp_only_layers, f"indices {bad} >= num_hidden_layers={L}")
            check(any(m.moe_layer_mask(L)), "moe", "no MoE layer",
                  f"decoder_sparse_step={m.decoder_sparse_step} / mlp_only_layers / moe_layers select no layer "
                  f"of {L}; set moe to null for a dense model")

    # ---- the layer pattern ---------------------------------------------------------------------------
    def layer_mixers(self) -> Tuple[str, ...]:
        """The sequence mixer of each layer: "attention" or an SSM mixer name."""
        return self.mixer_types if self.mixer_types is not None else ("attention",) * self.num_hidden_layers

    def layer_ffns(self) -> Tuple[str, ...]:
        """The FFN of each layer: "moe" where `moe.moe_layer_mask` selects it, else "dense"."""
        mask = self.moe.moe_layer_mask(self.num_hidden_layers) if self.moe is not None else \
            (False,) * self.num_hidden_layers
        return tuple("moe" if m else "dense" for m in mask)

    def layer_kinds(self) -> Tuple[Tuple[str, str], ...]:
        """(mixer, ffn) of each layer, e.g. ("attention", "moe") or ("mamba", "dense")."""
        return tuple(zip(self.layer_mixers(), self.layer_ffns()))

    @property
    def attention_layers(self) -> Tuple[int, ...]:
        """Indices of the attention layers (the KV cache holds these only, in this order)."""
        return tuple(i for i, m in enumerate(self.layer_mixers()) if m == "attention")

    @property
    def num_attention_layers(self) -> int:
        return len(self.attention_layers)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    def layer_windows(self) -> Tuple[Optional[int], ...]:
        """The sliding window of each layer (None = full attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_hidden_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.resolved_head_dim * self.partial_rotary_factor)

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied; SSM mixers counted from their modules)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.resolved_head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        attn += d if self.attention_out_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        dense = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        total = 0
        for mixer, ffn in self.layer_kinds():
            total += 2 * d + (attn if mixer == "attention" else self._ssm_mixer_params(mixer))
            if ffn == "dense":
                total += dense
            else:
                m = self.moe
                total += d * m.num_experts + 3 * m.num_experts * d * m.moe_intermediate_size
                if m.has_shared_expert:
                    total += 3 * d * m.shared_expert_intermediate_size + (d if m.shared_expert_gate else 0)
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total + emb + d

    def _ssm_mixer_params(self, mixer: str) -> int:
        import jax
        import jax.numpy as jnp

        from iva_jax.ssm import make_mixer

        mod = make_mixer(self.ssm.replace(type=mixer), self.hidden_size)
        x = jax.ShapeDtypeStruct((1, 4, self.hidden_size), jnp.float32)
        shapes = jax.eval_shape(mod.init, jax.random.PRNGKey(0), x)
        return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes.get("params", {})))


def dtype_of(name: str):
    """The jnp dtype for a config dtype string."""
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def parse_overrides(items: Sequence[str]) -> dict:
    """`key=value` CLI overrides (values parsed as YAML scalars; dotted keys make nested dicts)."""
    out: dict = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"override {it!r} is not of the form key=value")
        k, v = it.split("=", 1)
        node = out
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _scalar(yaml.safe_load(v))
    return out


def _scalar(v: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; treat such strings as the numbers they are."""
    if isinstance(v, str):
        try:
            return float(v) if any(c in v.lower() for c in ".e") else int(v)
        except ValueError:
            return v
    return v

