"""Batches for HRM training and evaluation from a task's arrays (see tasks.py).

Training follows sapientinc/HRM's PuzzleDataset: each epoch visits every group (an original puzzle
with its augmentations) once in a random order and takes one random member of it.  The stream is
a pure function of (seed, step), so a resumed run sees exactly the batches an uninterrupted run
would.  Labels equal to the dataset's ignore id become IGNORE_LABEL_ID (-100); evaluation pads the
last batch with PAD inputs and ignored labels (such rows are not counted by the metrics).
"""

from __future__ import annotations

from typing import Dict, Iterator

import numpy as np

from iva_jax.hrm.losses import IGNORE_LABEL_ID


class PuzzleBatcher:
    """Deterministic batches over one split's arrays."""

    def __init__(self, arrays: Dict[str, np.ndarray], metadata: dict, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(arrays["inputs"])
        if n == 0:
            raise ValueError("empty dataset")
        for k in ("labels", "puzzle_identifiers", "group_ids"):
            if len(arrays[k]) != n:
                raise ValueError(f"dataset field {k} has {len(arrays[k])} rows, inputs has {n}")
        self.arrays, self.meta, self.batch_size, self.seed = arrays, metadata, batch_size, seed
        groups = arrays["group_ids"]
        order = np.argsort(groups, kind="stable")
        uniq, starts, sizes = np.unique(groups[order], return_index=True, return_counts=True)
        self._members, self._starts, self._sizes = order, starts, sizes
        self.num_groups = len(uniq)
        self._epoch_cache: Dict[int, np.ndarray] = {}

    def _epoch(self, e: int) -> np.ndarray:
        """Example indices of epoch e: groups permuted, one random member each."""
        if e not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, e])
            perm = rng.permutation(self.num_groups)
            pick = (rng.random(self.num_groups) * self._sizes[perm]).astype(np.int64)
            self._epoch_cache = {e: self._members[self._starts[perm] + pick]}
        return self._epoch_cache[e]

    def _collate(self, idx: np.ndarray, pad_to: int) -> Dict[str, np.ndarray]:
        a = self.arrays
        inputs = a["inputs"][idx].astype(np.int32)
        labels = a["labels"][idx].astype(np.int32)
        ignore = self.meta.get("ignore_label_id")
        if ignore is not None:
            labels[labels == ignore] = IGNORE_LABEL_ID
        pids = a["puzzle_identifiers"][idx].astype(np.int32)
        pad = pad_to - len(idx)
        if pad > 0:
            inputs = np.pad(inputs, ((0, pad), (0, 0)), constant_values=self.meta.get("pad_id", 0))
            labels = np.pad(labels, ((0, pad), (0, 0)), constant_values=IGNORE_LABEL_ID)
            pids = np.pad(pids, (0, pad), constant_values=self.meta.get("blank_identifier_id", 0))
        return {"inputs": inputs, "labels": labels, "puzzle_identifiers": pids}

    def train_batch(self, step: int) -> Dict[str, np.ndarray]:
        """The batch of training step `step` (0-based): positions [step*B, (step+1)*B) of the epoch stream."""
        B, G = self.batch_size, self.num_groups
        pos = np.arange(step * B, (step + 1) * B, dtype=np.int64)
        idx = np.empty(B, np.int64)
        for e in np.unique(pos // G):
            sel = pos // G == e
            idx[sel] = self._epoch(int(e))[pos[sel] % G]
        return self._collate(idx, B)

    def eval_batches(self, max_batches: int | None = None) -> Iterator[Dict[str, np.ndarray]]:
        """Every example once, in order; the last batch padded."""
        n = len(self.arrays["inputs"])
        for i, start in enumerate(range(0, n, self.batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self._collate(np.arange(start, min(n, start + self.batch_size)), self.batch_size)

    def steps_per_epoch(self) -> float:
        return self.num_groups / self.batch_size
