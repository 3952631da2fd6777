"""The addition task (answer extraction on tricky strings, format reward, splits) and RLConfig."""

from pathlib import Path

import numpy as np
import pytest

from iva_jax.rl import AdditionProblem, AdditionTask, RLConfig, TaskConfig, extract_answer, make_addition_splits
from iva_jax.rl.tasks import addition_reward, correctness_reward, format_reward, is_just_number

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

RIGHT_579 = [
    "579", "  579\n", "**579**", "579.", "`579`", "579.0", "579.00",
    "The answer is 579.", "Answer: 579", "answer = 579", "The answer is **579**.",
    "123 + 456 = 579", "123 + 456 = 579. Let me know if you need help with 2 more problems!",
    "The sum of 123 and 456 is 579.", "\\boxed{579}", "$\\boxed{579}$", "So 123 + 456 = \\(579\\).",
    "The answer is 579, not 578.", "579<|im_end|>", "579</s>", "<|im_start|>assistant\n579<|im_end|><|endoftext|>",
]
WRONG_579 = [
    "578", "5790", "57 9", "-579", "", "I don't know.", "<|im_end|>",
    "579.5",  # not an integer
    "The answer is 578. Just kidding, 579",  # an explicit answer cue wins over later numbers
    "123 + 456 = 1000",
]


@pytest.mark.parametrize("text", RIGHT_579)
def test_extracts_right_answers(text):
    assert extract_answer(text) == 579


@pytest.mark.parametrize("text", WRONG_579)
def test_rejects_wrong_answers(text):
    assert extract_answer(text) != 579


def test_extraction_details():
    assert extract_answer("1,234") == 1234
    assert extract_answer("The answer is 1,234.") == 1234
    assert extract_answer("12,34") != 1234
    assert extract_answer("0") == 0
    assert extract_answer("579.5") is None
    assert extract_answer("no digits here") is None
    assert extract_answer("-12") == -12


def test_format_reward():
    just = ["579", " 579 \n", "**579**", "579.", "579<|im_end|>", "1,234"]
    not_just = ["The answer is 579", "579 because 123 + 456", "", "579 579", "5 + 7"]
    assert all(is_just_number(t) for t in just)
    assert not any(is_just_number(t) for t in not_just)
    np.testing.assert_array_equal(format_reward(just + not_just), [1.0] * len(just) + [0.0] * len(not_just))


def test_rewards_on_decoded_strings():
    comps = ["579", "The answer is 579.", "578", "**579**<|im_end|>"]
    np.testing.assert_array_equal(correctness_reward(comps, [579] * 4), [1, 1, 0, 1])
    np.testing.assert_allclose(addition_reward(comps, [579] * 4, format_weight=0.25), [1.25, 1.0, 0.25, 1.25])
    assert addition_reward(comps, [579] * 4).dtype == np.float32
    with pytest.raises(ValueError, match="answers"):
        correctness_reward(comps, [579])


def test_prompt_and_messages():
    p = AdditionProblem(123, 456)
    assert p.prompt == "What is 123 + 456? Answer with just the number." and p.answer == 579
    assert p.messages() == [{"role": "user", "content": p.prompt}]
    assert p.messages("Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_splits_disjoint_deterministic_and_heldout_stable():
    train, held = make_addition_splits(300, 50, min_digits=2, max_digits=3, seed=7)
    assert len(train) == 300 and len(held) == 50
    pairs = lambda ps: {(min(p.a, p.b), max(p.a, p.b)) for p in ps}
    assert len(pairs(train)) == 300 and len(pairs(held)) == 50  # no duplicates, even commuted
    assert not pairs(train) & pairs(held)
    assert all(10 <= x < 1000 for p in train + held for x in (p.a, p.b))
    assert {len(str(p.a)) for p in train} == {2, 3}
    train2, held2 = make_addition_splits(300, 50, min_digits=2, max_digits=3, seed=7)
    assert train2 == train and held2 == held
    _, held3 = make_addition_splits(10, 50, min_digits=2, max_digits=3, seed=7)
    assert held3 == held  # the held-out set does not depend on the train size
    _, held4 = make_addition_splits(300, 50, min_digits=2, max_digits=3, seed=8)
    assert held4 != held
    with pytest.raises(ValueError, match="distinct"):
        make_addition_splits(50, 10, min_digits=1, max_digits=1)  # only 55 unordered 1-digit pairs
    with pytest.raises(ValueError, match="min_digits"):
        make_addition_splits(5, 5, min_digits=3, max_digits=2)


def test_task_object_and_config():
    cfg = TaskConfig(n_train=40, n_eval=8, min_digits=2, max_digits=2, seed=1, format_weight=0.1)
    task = AdditionTask.from_config(cfg)
    assert len(task.split("train")) == 40 and len(task.split("held_out")) == 8
    probs = task.held_out[:3]
    comps = [str(probs[0].answer), f"It is {probs[1].answer}.", "7"]
    np.testing.assert_allclose(task.rewards(comps, probs), [1.1, 1.0, 0.1], rtol=1e-6)  # sums >= 20 here
    assert task.accuracy(comps, probs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="split"):
        task.split("test")


def test_rl_config_yaml_and_validation():
    grpo = RLConfig.from_yaml(CONFIGS / "train_grpo.yaml")
    ppo = RLConfig.from_yaml(CONFIGS / "train_ppo.yaml")
    assert grpo.algorithm == "grpo" and grpo.group_size >= 2 and grpo.kl_mode == "loss"
    assert ppo.algorithm == "ppo" and ppo.kl_mode == "reward" and ppo.adaptive_kl
    assert RLConfig.from_yaml(grpo.to_yaml()) == grpo
    assert grpo.resolved_norm_len == grpo.max_new_tokens
    assert RLConfig(kl_estimator="k3+").kl_estimator == "k3+"
    bad = [
        dict(clip_ratio_c=1.0), dict(loss_agg_mode="mean"), dict(group_size=1), dict(kl_estimator="k5"),
        dict(clip_ratio_low=1.2), dict(scale_rewards="seq"), dict(label_smoothing=0.5), dict(top_p=0.0),
        dict(algorithm="a2c"), dict(dpo_loss_type="kto"), dict(kl_mode="both"), dict(lam=1.5),
    ]
    for kw in bad:
        field = next(iter(kw))
        with pytest.raises(ValueError, match=field):
            RLConfig(**kw)
    with pytest.raises(ValueError, match="unknown RLConfig keys"):
        RLConfig.from_dict({"clip_eps": 0.2})
    with pytest.raises(ValueError, match="max_digits"):
        TaskConfig(min_digits=3, max_digits=2)
