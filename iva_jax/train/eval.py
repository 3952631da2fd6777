"""Text-quality metrics for evaluation: perplexity, distinct-n, and repetition rate.

* `perplexity(nll_sum, tokens)` = exp(mean token negative log-likelihood).
* `distinct_n` (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models"): unique n-grams / total n-grams, pooled over all sequences (corpus level).
* `repetition_rate` = seq-rep-n of Welleck et al. 2019 ("Neural Text Generation with Unlikelihood
  Training"): per sequence, 1 - unique n-grams / n-grams, averaged over sequences (n = 4 there).
Sequences are token-id lists (or strings, split on whitespace).
"""

from __future__ import annotations

import math
from typing import Iterable, List, Sequence, Union

Seq = Union[str, Sequence[int]]


def _tokens(seq: Seq) -> List:
    return seq.split() if isinstance(seq, str) else list(seq)


def _ngrams(toks: List, n: int) -> List[tuple]:
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def perplexity(nll_sum: float, tokens: float) -> float:
    """exp(nll_sum / tokens); ValueError when there are no tokens."""
    if tokens <= 0:
        raise ValueError(f"perplexity needs tokens > 0, got {tokens}")
    return math.exp(nll_sum / tokens)


def distinct_n(seqs: Iterable[Seq], n: int = 2) -> float:
    """Unique n-grams / total n-grams over all sequences (0.0 when no sequence has n tokens)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    total, unique = 0, set()
    for s in seqs:
        grams = _ngrams(_tokens(s), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def repetition_rate(seqs: Iterable[Seq], n: int = 4) -> float:
    """Mean over sequences of 1 - unique n-grams / n-grams (seq-rep-n); sequences shorter than n are skipped."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    rates = []
    for s in seqs:
        grams = _ngrams(_tokens(s), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def generation_metrics(seqs: Sequence[Seq]) -> dict:
    """{"distinct_2", "rep_4", "mean_len"} for generated continuations."""
    seqs = list(seqs)
    lens = [len(_tokens(s)) for s in seqs]
    return {"distinct_2": distinct_n(seqs, 2), "rep_4": repetition_rate(seqs, 4),
            "mean_len": sum(lens) / len(lens) if lens else 0.0}
