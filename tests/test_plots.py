"""PNG plots from small synthetic telemetry / profile inputs: files are real PNGs of the expected panel
layout, series extraction skips records without a key, and bad input raises a clear error."""

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="plots need matplotlib (the test extra installs it)")

from matplotlib.image import imread  # noqa: E402

from iva_jax.analysis import plots  # noqa: E402
from iva_jax.analysis.scaling_law import fit_broken_power_law  # noqa: E402
from iva_jax.train.telemetry import make_record  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
    assert path.read_bytes()[:8] == PNG
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something was drawn
    return img


@pytest.fixture
def sft_log(tmp_path):
    p = tmp_path / "sft.jsonl"
    mem = {"vram_gb": 0.1, "source": "host_rss"}
    with p.open("w") as f:
        for s in range(1, 21):
            rec = make_record(s, {"loss": 3.0 / s ** 0.3, "tokens": 512.0}, step_time_s=0.1, memory=mem)
            if s % 5 == 0:
                rec["eval"] = {"eval_loss": 3.2 / s ** 0.3, "eval_ppl": 10.0}
            f.write(json.dumps(rec) + "\n")
        f.write("\n")
    return p


def test_loss_curves_from_telemetry(tmp_path, sft_log):
    x, y = plots.series(plots.read_records(sft_log), "eval.eval_loss")
    np.testing.assert_array_equal(x, [5, 10, 15, 20])  # only records with an eval block
    np.testing.assert_allclose(y, 3.2 / x ** 0.3)
    one = _png(plots.plot_loss_curves(sft_log, tmp_path / "loss.png"))
    assert one.shape[1] > 1.5 * one.shape[0]  # two panels side by side: train and eval loss
    # several runs, one of them given as records
    recs = plots.read_records(sft_log)[:10]
    _png(plots.plot_loss_curves({"a": sft_log, "b": recs}, tmp_path / "two.png", smooth=3))


def test_reward_and_hrm_curves(tmp_path):
    rl = [{"step": s, "rl": {"reward_mean": 0.1 + 0.04 * s, "reward_std": 0.05, "kl": 0.001 * s}} for s in range(12)]
    _png(plots.plot_reward_curves(rl, tmp_path / "reward.png"))
    # HRM logs train and eval records in one file, with top-level metrics and an hrm block
    hrm = [{"event": "train", "step": s, "loss": 2.0 - 0.05 * s, "hrm": {"halt_rate": 0.4, "avg_steps": 2.5}}
           for s in range(1, 9)] + [{"event": "eval", "step": 8, "exact_accuracy": 0.2}]
    _png(plots.plot_curves(hrm, ["hrm.halt_rate", "hrm.avg_steps"], tmp_path / "halting.png"))
    _png(plots.plot_loss_curves(hrm, tmp_path / "hrm_loss.png"))


def test_kernel_speed_bars(tmp_path):
    profile = {"meta": {"device": "fake GPU", "jax": "0", "date": "today",
                        "ceilings": {"copy": 3000.0, "mm_torch": 700.0}},
               "rows": [{"group": "ceiling", "name": "copy", "ms": 0.3, "figure": 3000.0, "unit": "GB/s"},
                        {"group": "rms_fwd", "name": "rms 32768x4096 ours-triton", "ms": 0.2, "figure": 2600.0,
                         "unit": "GB/s", "H": 4096, "impl": "triton"},
                        {"group": "rms_fwd", "name": "rms 32768x4096 torch F.rms_norm", "ms": 0.25, "figure": 2100.0,
                         "unit": "GB/s", "H": 4096, "impl": "torch"},
                        {"group": "attn_fwd", "name": "B4 S4096 | ours-auto(mosaic)", "ms": 0.5, "figure": 490.0,
                         "unit": "TFLOP/s"},
                        {"group": "attn_fwd", "name": "B4 S4096 | jax cuDNN", "ms": 0.5, "figure": 500.0,
                         "unit": "TFLOP/s"},
                        {"group": "gmm_fwd", "case": "E8 top2", "label": "ours-auto(triton)", "name": "x", "ms": 1.0,
                         "figure": 400.0, "unit": "TFLOP/s"},
                        {"group": "sweep", "name": "rms tile", "ms": 0.2, "figure": 2700.0, "unit": "GB/s"},
                        {"group": "error", "name": "broken", "error": "boom"}]}
    panels = plots.kernel_panels(profile)
    assert set(panels) == {("rms_fwd", "rms 32768x4096"), ("attn_fwd", "B4 S4096"), ("gmm_fwd", "E8 top2")}
    assert [b["label"] for b in panels[("rms_fwd", "rms 32768x4096")]] == ["ours-triton", "torch F.rms_norm"]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    _png(plots.plot_kernel_speed(path, tmp_path / "k.png"))
    _png(plots.plot_kernel_speed(profile, tmp_path / "k1.png", groups=["attn_fwd"]))
    with pytest.raises(ValueError, match="groups present"):
        plots.plot_kernel_speed(profile, tmp_path / "k2.png", groups=["nope"])


def test_scaling_law_plot(tmp_path):
    c = np.geomspace(1e15, 1e20, 12)
    loss = 3.0 * (c / 1e17) ** np.where(c < 1e17, -0.3, -0.1)
    _png(plots.plot_scaling_law(c, loss, fit_broken_power_law(c, loss), tmp_path / "scaling.png"))


def test_bad_inputs(tmp_path, sft_log):
    with pytest.raises(ValueError, match="no record has 'rl.reward_mean'"):
        plots.plot_curves(sft_log, ["rl.reward_mean"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="PNG"):
        plots.plot_loss_curves(sft_log, tmp_path / "x.pdf")
    with pytest.raises(ValueError, match="does not exist"):
        plots.plot_loss_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        plots.read_records(bad)
