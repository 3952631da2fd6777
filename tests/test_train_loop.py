"""The fit loop: a NaN batch is skipped and counted (telemetry, progress, result) and training goes on;
eval / checkpoint cadence; model metric blocks; YAML + key=value config loading; mesh subsets."""

import jax
import numpy as np
import pytest

from iva_jax.parallel import MeshConfig
from iva_jax.train.checkpoint import Checkpointer
from iva_jax.train.config import TrainConfig, load_config
from iva_jax.train.loop import fit, model_blocks
from iva_jax.train.step import create_train_state, make_train_step, make_tx_and_schedule
from iva_jax.train.telemetry import Telemetry, read_jsonl
from iva_jax.train.tiny import TinyConfig, tiny_host_params


class Batches:
    """Random batches; `nan_at` (1-based) poisons that batch's loss weights; `state()` counts batches."""

    def __init__(self, vocab, nan_at=()):
        self.rng, self.n, self.nan_at, self.vocab = np.random.default_rng(0), 0, set(nan_at), vocab

    def __next__(self):
        self.n += 1
        ids = self.rng.integers(0, self.vocab, (4, 10)).astype(np.int32)
        mask = np.ones((4, 10), np.float32)
        if self.n in self.nan_at:
            mask[1, 4] = np.nan
        return {"input_ids": ids, "loss_mask": mask}

    def state(self):
        return {"batches": self.n}


@pytest.fixture(scope="module")
def tiny():
    """One compiled train step shared by the tests (the loop settings are passed to `fit` separately)."""
    model, _, params = tiny_host_params(TinyConfig(vocab_size=61), seed=2)
    cfg = TrainConfig(steps=10, batch_size=4, seq_len=10, lr=3e-3, warmup_steps=0, compute_dtype="float32")
    tx, sched = make_tx_and_schedule(cfg)
    step = make_train_step(model.apply, tx, cfg, schedule=sched)
    return dict(cfg=cfg, sched=sched, step=step, fresh=lambda: create_train_state(params, tx, jax.random.PRNGKey(0))[0])


def test_nan_batch_is_skipped_and_counted_in_the_loop(tiny, tmp_path):
    step, sched, state = tiny["step"], tiny["sched"], tiny["fresh"]()
    cfg = tiny["cfg"].replace(steps=6, log_every=1, eval_every=3, checkpoint_every=3)
    evals = []

    def eval_fn(st, s):
        evals.append((s, int(st.step)))
        return {"eval_loss": float(s)}

    with Checkpointer(tmp_path / "ck", async_save=False, keep=5) as ck:
        res = fit(step, state, Batches(61, nan_at={3}), cfg, eval_fn=eval_fn, checkpointer=ck,
                  telemetry=Telemetry(tmp_path / "t.jsonl"), progress=True)
        assert ck.all_steps() == [3, 6]
        assert ck.restore(res.state).data_state == {"batches": 6}
    recs = read_jsonl(tmp_path / "t.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and recs == res.records
    assert [r["quality"]["skipped"] for r in recs] == [0, 0, 1, 1, 1, 1]
    assert recs[2]["quality"]["loss"] is None and recs[2]["health"]["consecutive_skips"] == 1
    assert all(np.isfinite(r["quality"]["loss"]) for i, r in enumerate(recs) if i != 2)
    assert res.skipped == 1 and res.step == 6 and not res.stopped_early and int(res.state.step) == 6
    assert evals == [(3, 3), (6, 6)] and recs[2]["eval"] == {"eval_loss": 3.0} and "eval" not in recs[3]
    # the skipped step did not move the schedule: the LR after it is the LR of the third applied update
    assert recs[3]["quality"]["lr"] == pytest.approx(float(sched(2)))


def test_stop_after_and_data_end(tiny, tmp_path):
    step, state = tiny["step"], tiny["fresh"]()
    cfg = tiny["cfg"].replace(log_every=100, checkpoint_every=100)
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        res = fit(step, state, Batches(61), cfg, checkpointer=ck, stop_after=4, progress=False)
        assert ck.all_steps() == [4]  # saved where it stopped, for resume
    assert res.stopped_early and res.step == 4 and [r["step"] for r in res.records] == [1, 4]

    def three():
        b = Batches(61)
        for _ in range(3):
            yield next(b)

    res2 = fit(step, res.state, three(), cfg, start_step=4, progress=False)
    assert res2.stopped_early and res2.step == 7 and int(res2.state.step) == 7
    with pytest.raises(ValueError, match="start_step=11"):
        fit(step, res2.state, three(), cfg, start_step=11)


def test_model_blocks_group_moe_hrm_quant_metrics():
    m = {"loss": 1.0, "model/layers/moe/load_std": 0.3, "model/moe/drop_pct": 2.0, "model/hrm/halt_rate": 0.5,
         "model/layers/act_rms": 1.0}
    assert model_blocks(m) == {"moe": {"layers/load_std": 0.3, "drop_pct": 2.0}, "hrm": {"halt_rate": 0.5}}


def test_load_config_yaml_plus_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 7\nlr: 1.0e-3\nmesh:\n  fsdp: 2\ndata:\n  paths: [a.jsonl]\n")
    cfg = load_config(TrainConfig, p, ["lr=2e-4", "mesh.tensor=2", "data.eval_fraction=0.1", "remat=full"])
    assert cfg.steps == 7 and cfg.lr == 2e-4 and isinstance(cfg.lr, float)
    assert cfg.mesh == MeshConfig(fsdp=2, tensor=2) and cfg.data.paths == ("a.jsonl",) and cfg.data.eval_fraction == 0.1
    with pytest.raises(ValueError,
                       match=r"unknown MeshConfig keys \['pipe'\]; valid keys: \['data', 'expert', 'fsdp', 'tensor'\]"):
        load_config(TrainConfig, p, ["mesh.pipe=2"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_mesh_subset_of_devices():
    mesh = MeshConfig(data=1).build(allow_subset=True)
    assert mesh.devices.size == 1 and mesh.devices.flat[0] == jax.devices()[0]
    assert MeshConfig(data=2, tensor=2).build(allow_subset=True).devices.size == 4
    with pytest.raises(ValueError, match="multiply to 1, but 8 devices"):
        MeshConfig(data=1).build()
