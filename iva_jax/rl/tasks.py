"""A verifiable task: multi-digit addition with answer checking and a format reward.

Prompts are chat user turns for an instruct model (SmolLM2-Instruct style), e.g.
"What is 123 + 456? Answer with just the number."  Rewards work on decoded completion strings
(the generated text only, not the prompt).  Train and held-out problems come from separate
random streams of one seed and never share an operand pair (in either order), so the held-out
set does not depend on how many training problems are drawn.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

PROMPT_TEMPLATE = "What is {a} + {b}? Answer with just the number."

_SPECIAL = re.compile(r"<\|[^|<>]*\|>|</s>|<s>|<eos>|<pad>")
_NUM = r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?"
_NUM_RE = re.compile(_NUM)
_DECOR = r"[\s*_`$\\(]*"  # markdown / latex decoration between a cue and the number
_BOXED = re.compile(r"\\boxed\s*\{\s*(" + _NUM + r")\s*\}")
_ANSWER = re.compile(r"answer(?:\s+is)?\s*[:=]?" + _DECOR + "(" + _NUM + ")", re.IGNORECASE)
_EQUALS = re.compile(r"=" + _DECOR + "(" + _NUM + ")")
_JUST_NUMBER = re.compile(r"^[*_`\s]*" + _NUM + r"[*_`\s]*\.?\s*$")


@dataclasses.dataclass(frozen=True)
class AdditionProblem:
    """One problem a + b; `prompt` is the user turn, `answer` the integer sum."""

    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(a=self.a, b=self.b)

    def messages(self, system_prompt: Optional[str] = None) -> List[Dict[str, str]]:
        """Chat messages for `tokenizer.apply_chat_template(..., add_generation_prompt=True)`."""
        msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return msgs + [{"role": "user", "content": self.prompt}]


def _sample_operand(rng: np.random.Generator, min_digits: int, max_digits: int) -> int:
    d = int(rng.integers(min_digits, max_digits + 1))
    lo = 0 if d == 1 else 10 ** (d - 1)
    return int(rng.integers(lo, 10 ** d))


def _draw(rng: np.random.Generator, n: int, min_digits: int, max_digits: int, taken: set) -> List[AdditionProblem]:
    out: List[AdditionProblem] = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        a, b = _sample_operand(rng, min_digits, max_digits), _sample_operand(rng, min_digits, max_digits)
        key = (min(a, b), max(a, b))
        if key not in taken:
            taken.add(key)
            out.append(AdditionProblem(a, b))
    raise ValueError(f"cannot draw {n} distinct problems with {min_digits}-{max_digits} digit operands "
                     f"({len(taken)} distinct pairs drawn so far); use more digits or fewer problems")


def make_addition_splits(n_train: int, n_eval: int, min_digits: int = 1, max_digits: int = 3,
                         seed: int = 0) -> Tuple[List[AdditionProblem], List[AdditionProblem]]:
    """(train, held_out) problems: disjoint operand pairs, deterministic in `seed`.

    Each operand has a uniformly chosen digit count in [min_digits, max_digits], then a uniform
    value with that many digits.  The held-out list depends only on (n_eval, digits, seed).
    """
    if not (isinstance(min_digits, int) and isinstance(max_digits, int) and 1 <= min_digits <= max_digits):
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train}, {n_eval}")
    taken: set = set()
    held_out = _draw(np.random.default_rng([seed, 1]), n_eval, min_digits, max_digits, taken)
    train = _draw(np.random.default_rng([seed, 0]), n_train, min_digits, max_digits, taken)
    return train, held_out


def _parse(num: str) -> Optional[int]:
    num = num.replace(",", "")
    if "." in num:
        whole, frac = num.split(".")
        if frac.strip("0"):
            return None  # not an integer
        num = whole
    return int(num)


def clean_completion(text: str) -> str:
    """Strip chat special tokens (<|im_end|>, </s>, ...) and surrounding whitespace."""
    return _SPECIAL.sub(" ", text).strip()


def extract_answer(text: str) -> Optional[int]:
    """The integer a completion answers, or None.

    Priority: the last \\boxed{N}; else the last "answer (is|:) N"; else the number after the last
    "="; else the last number in the text.  "1,234" and "579.0" parse; "579.5" gives None.
    """
    text = clean_completion(text)
    for pattern in (_BOXED, _ANSWER, _EQUALS):
        found = pattern.findall(text)
        if found:
            return _parse(found[-1])
    found = _NUM_RE.findall(text)
    return _parse(found[-1]) if found else None


def is_just_number(text: str) -> bool:
    """True when the completion is only a number (optionally bold/code, a final period)."""
    return bool(_JUST_NUMBER.match(clean_completion(text)))


def correctness_reward(completions: Sequence[str], answers: Sequence[int]) -> np.ndarray:
    """1.0 where the extracted answer equals the true sum, else 0.0 (float32, [n])."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    return np.array([float(extract_answer(c) == int(a)) for c, a in zip(completions, answers)], np.float32)


def format_reward(completions: Sequence[str]) -> np.ndarray:
    """1.0 where the completion follows the instruction "answer with just the number", else 0.0."""
    return np.array([float(is_just_number(c)) for c in completions], np.float32)


def addition_reward(completions: Sequence[str], answers: Sequence[int], format_weight: float = 0.0) -> np.ndarray:
    """correctness + format_weight * format, per completion (float32, [n])."""
    r = correctness_reward(completions, answers)
    return r + np.float32(format_weight) * format_reward(completions) if format_weight else r


class AdditionTask:
    """The built-in verifiable task: train/held-out problems and a reward on decoded strings."""

    def __init__(self, n_train: int = 2000, n_eval: int = 200, min_digits: int = 1, max_digits: int = 3,
                 seed: int = 0, format_weight: float = 0.0):
        self.format_weight = format_weight
        self.train, self.held_out = make_addition_splits(n_train, n_eval, min_digits, max_digits, seed)

    @classmethod
    def from_config(cls, cfg) -> "AdditionTask":
        """Build from an `iva_jax.rl.config.TaskConfig`."""
        return cls(cfg.n_train, cfg.n_eval, cfg.min_digits, cfg.max_digits, cfg.seed, cfg.format_weight)

    def split(self, name: str) -> List[AdditionProblem]:
        if name not in ("train", "held_out"):
            raise ValueError(f"split {name!r}: must be 'train' or 'held_out'")
        return self.train if name == "train" else self.held_out

    def rewards(self, completions: Sequence[str], problems: Sequence[AdditionProblem]) -> np.ndarray:
        return addition_reward(completions, [p.answer for p in problems], self.format_weight)

    def accuracy(self, completions: Sequence[str], problems: Sequence[AdditionProblem]) -> float:
        return float(np.mean(correctness_reward(completions, [p.answer for p in problems]))) if problems else 0.0
