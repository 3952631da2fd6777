"""experiments/train_sft.py end to end on a tiny random HF Llama (byte tokenizer), on 8 fake CPU devices:
telemetry schema, resume == uninterrupted, sharded (data x fsdp x tensor) == single device with the real
decoder, checkpoint -> orbax_to_torch -> transformers logits, LoRA SFT (adapters only, merged export),
config errors.  Runs share a persistent compilation cache so repeated runs skip XLA compilation."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

pytest.importorskip("torch", reason="the SFT bridge tests need the torch extra")

from hf_tiny import hf_logits, tiny_hf  # noqa: E402
from iva_jax.train.checkpoint import Checkpointer  # noqa: E402
from iva_jax.train.telemetry import read_jsonl, validate_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
COMMON = [f"steps={STEPS}", "batch_size=4", "seq_len=24", "eval_every=2", "checkpoint_every=2", "log_every=1",
          "eval_batches=1", "gen_samples=2", "gen_max_new_tokens=6", "compute_dtype=float32", "lr=3e-3",
          "warmup_pct=null", "warmup_steps=1", "eps=1e-6", "data.eval_fraction=0.2", "tokenizer=bytes",
          "export_dtype=float32"]
# generation (the costliest compile here) is exercised in the LoRA run only; S trains without evaluation
SHARDED = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "gen_samples=0"]
SINGLE = ["mesh.data=1", "eval_every=-1"]
LORA = ["mesh.data=1", "lora.rank=4", "lora.alpha=8.0", "lora.targets=q_proj|v_proj", "lr=1e-2", "steps=3"]
QLORA = LORA + ["base_quant=int4", "base_quant_group_size=32", "eval_every=-1", "steps=2"]
HF_SHAPE = dict(vocab_size=258, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def _script():
    spec = importlib.util.spec_from_file_location("train_sft", ROOT / "experiments" / "train_sft.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for this module only (the runs recompile the same programs)."""
    from jax._src import compilation_cache as cc

    keys = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
            "jax_persistent_cache_min_compile_time_secs": 0.0}
    old = {k: getattr(jax.config, k) for k in keys}
    for k, v in keys.items():
        jax.config.update(k, v)
    cc.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, compile_cache):
    root = tmp_path_factory.mktemp("sft")
    hf_dir = root / "hf_base"
    hf_model = tiny_hf("llama", hf_dir, seed=3, **HF_SHAPE)
    main = _script().main

    def run(name, extra, stop_after=None):
        d = root / name
        argv = ["--no_progress"] + (["--stop_after", str(stop_after)] if stop_after else []) + COMMON + [
            f"model={hf_dir}", f"checkpoint_dir={d / 'ckpt'}", f"telemetry_path={d / 'telemetry.jsonl'}",
            f"export_dir={d / 'hf'}"] + extra
        return main(argv)

    out = {"root": root, "hf_dir": hf_dir, "hf_model": hf_model}
    out["A"] = run("A", SHARDED)  # uninterrupted, sharded 2 x 2 x 2
    out["B1"] = run("B", SHARDED, stop_after=2)  # interrupted after step 2 ...
    out["B2"] = run("B", SHARDED)  # ... and resumed
    out["S"] = run("S", SINGLE)  # the same run on one device
    out["L"] = run("L", LORA)  # LoRA on one device, with generation metrics
    out["Q"] = run("Q", QLORA)  # QLoRA: LoRA over an int4 base
    return out


def _records(runs, name):
    return read_jsonl(runs["root"] / name / "telemetry.jsonl")


def test_telemetry_records_follow_the_schema(runs):
    recs = _records(runs, "A")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        validate_record(r)
        assert r["speed"]["tokens_per_sec"] > 0 and r["speed"]["step_time_ms"] > 0
        assert r["memory"]["vram_gb"] > 0 and np.isfinite(r["quality"]["ppl"]) and r["quality"]["skipped"] == 0
    assert recs[0]["speed"]["includes_compile"] is True and "includes_compile" not in recs[1]["speed"]
    for r in (recs[1], recs[3]):  # eval_every=2
        ev = r["eval"]
        assert np.isfinite(ev["eval_ppl"]) and abs(ev["eval_ppl"] - np.exp(ev["eval_nll"])) < 1e-6 * ev["eval_ppl"]
    assert "eval" not in recs[0] and "eval" not in recs[2]
    assert runs["A"].fit.last_eval == pytest.approx(recs[3]["eval"])
    assert recs[-1]["quality"]["loss"] < recs[0]["quality"]["loss"]  # it trains
    # greedy generations (LoRA run: eval at step 2 and after the last step 3)
    lrec = _records(runs, "L")
    assert [("eval" in r) for r in lrec] == [False, True, True]
    for r in lrec[1:]:
        ev = r["eval"]
        assert 0 < ev["distinct_2"] <= 1 and 0 <= ev["rep_4"] < 1 and 0 < ev["mean_len"] <= 6
    assert not any("eval" in r for r in _records(runs, "S"))  # eval_every=-1: never


def test_resume_equals_uninterrupted(runs):
    a, b = _records(runs, "A"), _records(runs, "B")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and runs["B2"].resumed_from == 2 and runs["B1"].fit.stopped_early
    for ra, rb in zip(a, b):
        for k in ("loss", "grad_norm", "lr", "tokens"):
            assert rb["quality"][k] == ra["quality"][k], (ra["step"], k)
    assert b[3]["eval"] == a[3]["eval"]
    pa = Checkpointer(runs["root"] / "A" / "ckpt").restore_params(STEPS)
    pb = Checkpointer(runs["root"] / "B" / "ckpt").restore_params(STEPS)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(pa), jax.device_get(pb))


def test_sharded_decoder_step_equals_single_device(runs):
    a, s = _records(runs, "A"), _records(runs, "S")
    for ra, rs in zip(a, s):
        for k in ("loss", "grad_norm", "lr", "tokens"):
            np.testing.assert_allclose(rs["quality"][k], ra["quality"][k], rtol=2e-6, err_msg=f"{ra['step']}:{k}")
    q = runs["A"].state.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor") and len(q.sharding.device_set) == 8
    assert len(runs["S"].state.params["layers"]["self_attn"]["q_proj"]["kernel"].sharding.device_set) == 1
    pa, ps = jax.device_get(runs["A"].state.params), jax.device_get(runs["S"].state.params)
    # Adam's 1/sqrt(v) turns roundoff-level gradient differences into up to ~lr moves: 1% of a step (lr 3e-3)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=3e-5), pa, ps)


def test_checkpoint_converts_to_transformers_with_same_logits(runs, tmp_path):
    import transformers

    from iva_jax.models.transformer import Transformer
    from torch_bridge.hf_to_orbax import load_model
    from torch_bridge.orbax_to_torch import main as o2t

    ckpt = runs["root"] / "A" / "ckpt"
    o2t([str(ckpt), str(tmp_path / "conv"), "--step", str(STEPS)])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "conv")).eval()
    lm = load_model(ckpt)  # latest step = STEPS
    ids = np.random.default_rng(0).integers(0, 258, (2, 13)).astype(np.int32)
    ours = np.asarray(Transformer(lm.config.replace(dtype="float32")).apply({"params": lm.params}, jnp.asarray(ids)))
    ref = hf_logits(hf, ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    base = hf_logits(runs["hf_model"], ids)
    assert np.abs(ref - base).max() > 1e-3  # the converted weights are the trained ones, not the base
    # the script's own export equals the conversion of its last checkpoint, tensor for tensor
    from safetensors.numpy import load_file

    conv = load_file(tmp_path / "conv" / "model.safetensors")
    exp = load_file(runs["root"] / "A" / "hf" / "model.safetensors")
    assert sorted(conv) == sorted(exp)
    for k in conv:
        np.testing.assert_array_equal(conv[k], exp[k], err_msg=k)


def test_lora_sft_trains_adapters_only_and_exports_merged(runs, tmp_path):
    import transformers
    from safetensors.numpy import load_file

    from iva_jax.models.transformer import Transformer
    from iva_jax.train.lora import lora_apply
    from torch_bridge import load_pretrained
    from torch_bridge.orbax_to_torch import convert

    res, ckpt = runs["L"], runs["root"] / "L" / "ckpt"
    adapters = Checkpointer(ckpt).restore_params()
    names = {str(getattr(p[-1], "key", p[-1])) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    assert names == {"lora_a", "lora_b"} and set(adapters["layers"]["self_attn"]) == {"q_proj", "v_proj"}
    assert res.trainable_params == 2 * (64 * 4 + 4 * 64 + 64 * 4 + 4 * 32)  # 2 layers x (q: A + B, v: A + B)
    assert np.abs(np.asarray(adapters["layers"]["self_attn"]["q_proj"]["lora_b"])).max() > 1e-4  # B moved off 0
    # the frozen base stayed bit-identical to the HF weights it was loaded from
    _, base = load_pretrained(runs["hf_dir"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(res.state.frozen), jax.device_get(base))
    # merged export: only the adapted projections differ from the base, and transformers reproduces the
    # adapted forward pass
    src = load_file(runs["hf_dir"] / "model.safetensors")
    exp = load_file(runs["root"] / "L" / "hf" / "model.safetensors")
    changed = sorted(k for k in exp if not np.array_equal(exp[k], src[k]))
    assert changed == sorted(f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(runs["root"] / "L" / "hf")).eval()
    ids = np.random.default_rng(1).integers(0, 258, (2, 11)).astype(np.int32)
    model = Transformer(res.model.config)
    adapted = lora_apply(model.apply, res.config.lora)({"params": adapters, "frozen": base}, jnp.asarray(ids))
    np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(adapted), rtol=1e-5, atol=1e-5)
    # orbax_to_torch merges the adapters the same way (base found through lora.yaml)
    convert(ckpt, tmp_path / "conv")
    conv = load_file(tmp_path / "conv" / "model.safetensors")
    for k in exp:
        np.testing.assert_array_equal(conv[k], exp[k], err_msg=k)


def test_unknown_config_keys_are_rejected_listing_valid_ones(tmp_path):
    main = _script().main
    tiny_hf("llama", tmp_path / "hf", **HF_SHAPE)
    want = r"(?s)do not fit the model config .*\['up_proj'\]\['kernel'\]: \(2, 64, 96\) != expected \(2, 64, 100\)"
    with pytest.raises(ValueError, match=want):
        main([f"model={tmp_path / 'hf'}", "tokenizer=bytes", "model_overrides.intermediate_size=100",
              f"checkpoint_dir={tmp_path / 'ck'}"])
    with pytest.raises(ValueError, match=r"unknown SFTConfig keys \['learning_rate'\]; valid keys: \[.*'lora'.*'lr'"):
        main(["learning_rate=1e-3"])
    with pytest.raises(ValueError,
                       match=r"unknown LoRAConfig keys \['rnk'\]; valid keys: \['alpha', 'rank', 'targets'\]"):
        main(["lora.rnk=4"])
    with pytest.raises(ValueError, match=r"model_overrides=\['hiden_size'\].*valid keys: \[.*'hidden_size'"):
        main(["model_overrides.hiden_size=3"])
    with pytest.raises(ValueError, match="lr='fast'"):
        main(["lr=fast"])


def test_qlora_trains_adapters_over_an_int4_base_and_exports_dequantized_merge(runs, tmp_path):
    import transformers
    from safetensors.numpy import load_file

    from iva_jax.models.transformer import Transformer
    from iva_jax.quant import is_quantized
    from iva_jax.train.lora import lora_apply
    from iva_jax.train.sft import dequantize_leaf
    from torch_bridge.orbax_to_torch import convert

    res, ckpt = runs["Q"], runs["root"] / "Q" / "ckpt"
    frozen = res.state.frozen
    assert is_quantized(frozen["layers"]["self_attn"]["k_proj"]["kernel"])
    assert is_quantized(frozen["layers"]["mlp"]["down_proj"]["kernel"])
    assert not is_quantized(frozen["embed_tokens"]["embedding"])
    recs = _records(runs, "Q")
    assert recs[-1]["quant"]["base_bits"] == 4 and recs[-1]["quant"]["group_size"] == 32
    assert all(np.isfinite(r["quality"]["loss"]) for r in recs) and recs[-1]["quality"]["skipped"] == 0
    adapters = Checkpointer(ckpt).restore_params()
    assert np.abs(np.asarray(adapters["layers"]["self_attn"]["v_proj"]["lora_b"])).max() > 1e-4
    # the export is the dequantized int4 base with the adapters merged: transformers reproduces the QLoRA forward
    exp = load_file(runs["root"] / "Q" / "hf" / "model.safetensors")
    src = load_file(runs["hf_dir"] / "model.safetensors")
    k = "model.layers.0.self_attn.k_proj.weight"  # not adapted: the int4 round trip of the base weight
    w = src[k].T.astype(np.float64).reshape(2, 32, 32)  # [in, out] in groups of 32 input rows
    half_step = ((w.max(1) - w.min(1)) / 15 / 2)[:, None, :]  # asymmetric int4: step = range / 15
    err = np.abs(exp[k].T.astype(np.float64).reshape(2, 32, 32) - w)
    assert err.max() > 0 and np.all(err <= half_step * 1.01 + 1e-6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(runs["root"] / "Q" / "hf")).eval()
    ids = np.random.default_rng(2).integers(0, 258, (2, 9)).astype(np.int32)
    model = Transformer(res.model.config)
    apply = lora_apply(model.apply, res.config.lora, dequantize_leaf)
    ours = apply({"params": adapters, "frozen": frozen}, jnp.asarray(ids))
    np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(ours), rtol=1e-5, atol=1e-5)
    # orbax_to_torch re-quantizes the base as training did (lora.yaml records int4 / group 32) and merges alike
    conv = load_file(convert(ckpt, tmp_path / "conv") / "model.safetensors")
    for name in exp:
        np.testing.assert_allclose(conv[name], exp[name], rtol=0, atol=1e-7, err_msg=name)


def test_resume_names_settings_that_changed():
    from iva_jax.parallel import MeshConfig
    from iva_jax.train.sft import SFTConfig, resume_changes

    cfg = SFTConfig(steps=10)
    meta = {"train_config": cfg.to_yaml()}
    assert resume_changes(meta, cfg.replace(log_every=3, mesh=MeshConfig(fsdp=2), export_dir="x")) == []
    changed = cfg.replace(lr=1e-3, batch_size=4, data=cfg.data.replace(eval_fraction=0.5))
    assert resume_changes(meta, changed) == ["batch_size", "data", "lr"]
    assert resume_changes({}, cfg) == []
