"""Tokenized, packed, resumable batches from local text / JSONL / parquet files.

Documents:
  * `.txt` / `.md`: blocks separated by blank lines (the embedded corpus has one essay per block).
  * `.jsonl`: one JSON object per line, with `text_key`, or `prompt_key` + `completion_key` (SFT; with
    `completion_only_loss` the prompt tokens are not trained on).
  * `.parquet`: the same columns, read with pyarrow when it is installed (optional).
Each document becomes `[bos] + tokens + [eos]` and is packed greedily into rows of `seq_len`; a
document that does not fit is split and continues in the next row as a new segment.  Rows carry
`input_ids`, `labels` (-100 where nothing is trained), `segment_ids` (1, 2, ... per document piece,
0 = padding) and `positions` (restarting at 0 in each piece), the batch protocol of `train.step`.

Determinism and resume: the file order of epoch e is a seeded permutation (or the given order);
documents are read in file order; the held-out split is chosen per document by a hash of its text.
`state()` after a batch is a small JSON dict (epoch, file, byte offset / row, partly consumed
document); `load_state` continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

IGNORE_INDEX = -100
SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".json", ".ndjson", ".parquet")


def default_corpus_path() -> Path:
    """The small English corpus that ships with iva-jax (original essays; ~38 KB)."""
    return Path(__file__).resolve().parents[1] / "data" / "corpus.txt"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus bos=256 and eos=257 (vocab 258). For tests and smoke runs."""

    vocab_size = 258
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 257

    def __call__(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    encode = __call__

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _encode(tokenizer: Callable, text: str) -> List[int]:
    out = tokenizer(text)
    if isinstance(out, Mapping):  # a Hugging Face tokenizer returns a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


# ------------------------------------------------------------------------------------------------
# documents with resumable positions
# ------------------------------------------------------------------------------------------------
Doc = Tuple[str, str]  # (prompt, text); prompt is "" for plain text


def _iter_text(path: Path, start: int) -> Iterator[Tuple[Doc, int]]:
    with path.open("rb") as f:
        f.seek(start)
        lines: List[bytes] = []
        while True:
            line = f.readline()
            if not line or not line.strip():
                if lines:
                    yield ("", b"".join(lines).decode("utf-8", errors="replace").strip()), f.tell()
                    lines = []
                if not line:
                    return
            else:
                lines.append(line)


def _record_doc(rec: Mapping[str, Any], text_key: str, prompt_key: str, completion_key: str, where: str) -> Doc:
    if prompt_key in rec and completion_key in rec:
        return str(rec[prompt_key]), str(rec[completion_key])
    if text_key in rec:
        return "", str(rec[text_key])
    raise ValueError(f"{where}: record has neither {text_key!r} nor {prompt_key!r}+{completion_key!r}; "
                     f"keys {sorted(rec)}")


def _iter_jsonl(path: Path, start: int, keys: Tuple[str, str, str]) -> Iterator[Tuple[Doc, int]]:
    with path.open("rb") as f:
        f.seek(start)
        while True:
            line = f.readline()
            if not line:
                return
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} at byte {f.tell() - len(line)}: invalid JSON: {e}") from None
                yield _record_doc(rec, *keys, where=str(path)), f.tell()


def _iter_parquet(path: Path, start: int, keys: Tuple[str, str, str]) -> Iterator[Tuple[Doc, int]]:
    try:
        import pyarrow.parquet as pq  # type: ignore
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        recs = batch.to_pylist()
        if row + len(recs) <= start:
            row += len(recs)
            continue
        for rec in recs:
            row += 1
            if row > start:
                yield _record_doc(rec, *keys, where=str(path)), row


def iter_documents(path: str | Path, start: int = 0, text_key: str = "text", prompt_key: str = "prompt",
                   completion_key: str = "completion") -> Iterator[Tuple[Doc, int]]:
    """(document, position after it) pairs of one file, starting at `start` (byte offset or row)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    suffix = p.suffix.lower()
    keys = (text_key, prompt_key, completion_key)
    if suffix in (".txt", ".md", ".text"):
        return _iter_text(p, start)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _iter_jsonl(p, start, keys)
    if suffix == ".parquet":
        return _iter_parquet(p, start, keys)
    raise ValueError(f"{p}: unsupported data file type {suffix!r} (txt, md, jsonl, parquet)")


def in_eval_split(doc: Doc, eval_fraction: float) -> bool:
    """Deterministic held-out choice by a hash of the document text."""
    if eval_fraction <= 0:
        return False
    h = zlib.crc32((doc[0] + "\x00" + doc[1]).encode("utf-8")) % 100_000
    return h < eval_fraction * 100_000


def expand_paths(paths: Sequence[str | Path]) -> List[Path]:
    """Files named, or found (sorted) in named directories; defaults to the embedded corpus."""
    if not paths:
        return [default_corpus_path()]
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in SUFFIXES)
        elif not p.exists():
            raise FileNotFoundError(f"data file not found: {p}")
        elif p.suffix.lower() not in SUFFIXES:
            raise ValueError(f"{p}: unsupported data file type {p.suffix!r} ({', '.join(SUFFIXES)})")
        else:
            out.append(p)
    if not out:
        raise ValueError(f"no data files found in {list(map(str, paths))}")
    return out


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------
class PackedBatches:
    """Iterator of packed `[batch_size, seq_len]` numpy batches; `state()` / `load_state()` resume exactly."""

    def __init__(self, paths: Sequence[str | Path], tokenizer: Callable, *, seq_len: int, batch_size: int,
                 split: str = "train", eval_fraction: float = 0.0, text_key: str = "text",
                 prompt_key: str = "prompt", completion_key: str = "completion",
                 completion_only_loss: bool = True, add_bos: bool = False, add_eos: bool = True,
                 bos_id: Optional[int] = None, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                 shuffle_files: bool = True, seed: int = 0, loop: bool = True) -> None:
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split={split!r} must be 'train', 'eval' or 'all'")
        self.paths = expand_paths(paths)
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.split, self.eval_fraction = split, eval_fraction
        self.keys = (text_key, prompt_key, completion_key)
        self.completion_only_loss = completion_only_loss
        self.bos_id = bos_id if bos_id is not None else getattr(tokenizer, "bos_token_id", None)
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id; pass bos_id")
        if add_eos and self.eos_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id; pass eos_id")
        self.add_bos, self.add_eos = add_bos, add_eos
        self.pad_id = pad_id if pad_id is not None else (self.eos_id if self.eos_id is not None else 0)
        self.shuffle_files, self.seed, self.loop = shuffle_files, seed, loop
        self.load_state({"epoch": 0, "file": 0, "pos": 0, "carry_ids": [], "carry_mask": []})

    # -- state -------------------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        """JSON-able position: the next batch is the one after everything yielded so far."""
        return {"epoch": self._epoch, "file": self._file, "pos": self._pos,
                "carry_ids": list(self._carry_ids), "carry_mask": list(self._carry_mask), "batches": self._batches}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state()` dict."""
        missing = {"epoch", "file", "pos"} - set(state)
        if missing:
            raise ValueError(f"data state lacks {sorted(missing)}; got keys {sorted(state)}")
        self._epoch, self._file, self._pos = int(state["epoch"]), int(state["file"]), int(state["pos"])
        self._carry_ids = [int(t) for t in state.get("carry_ids", [])]
        self._carry_mask = [int(t) for t in state.get("carry_mask", [])]
        self._batches = int(state.get("batches", 0))
        self._docs: Optional[Iterator[Tuple[Doc, int]]] = None
        self._exhausted = False

    def _order(self, epoch: int) -> List[Path]:
        if not self.shuffle_files or len(self.paths) == 1:
            return list(self.paths)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
        return [self.paths[i] for i in perm]

    # -- documents ---------------------------------------------------------------------------------
    def _next_doc(self) -> Optional[Tuple[List[int], List[int]]]:
        """Tokens and loss mask of the next document of this split, or None when the data ended."""
        empty_epochs = 0
        while True:
            order = self._order(self._epoch)
            if self._file >= len(order):
                if not self.loop:
                    return None
                self._epoch, self._file, self._pos, self._docs = self._epoch + 1, 0, 0, None
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError(f"no {self.split} documents in {[str(p) for p in self.paths]}")
                continue
            if self._docs is None:
                self._docs = iter_documents(order[self._file], self._pos, *self.keys)
            nxt = next(self._docs, None)
            if nxt is None:
                self._file, self._pos, self._docs = self._file + 1, 0, None
                continue
            doc, self._pos = nxt
            if self.split != "all" and in_eval_split(doc, self.eval_fraction) != (self.split == "eval"):
                continue
            prompt, text = doc
            p_ids = _encode(self.tokenizer, prompt) if prompt else []
            t_ids = _encode(self.tokenizer, text)
            if not p_ids and not t_ids:
                continue
            empty_epochs = 0
            p_mask = 0 if (prompt and self.completion_only_loss) else 1
            ids = ([self.bos_id] if self.add_bos else []) + p_ids + t_ids + ([self.eos_id] if self.add_eos else [])
            mask = ([0] if self.add_bos else []) + [p_mask] * len(p_ids) + [1] * len(t_ids) + ([1] if self.add_eos else [])
            return ids, mask

    # -- batches ------------------------------------------------------------------------------------
    def _row(self) -> Optional[Dict[str, np.ndarray]]:
        S = self.seq_len
        ids = np.full(S, self.pad_id, np.int32)
        labels = np.full(S, IGNORE_INDEX, np.int32)
        seg = np.zeros(S, np.int32)
        pos = np.zeros(S, np.int32)
        filled, n_seg = 0, 0
        while filled < S:
            if not self._carry_ids:
                nxt = self._next_doc()
                if nxt is None:
                    break
                self._carry_ids, self._carry_mask = nxt
            take = min(S - filled, len(self._carry_ids))
            n_seg += 1
            piece = np.asarray(self._carry_ids[:take], np.int32)
            m = np.asarray(self._carry_mask[:take], bool)
            ids[filled:filled + take] = piece
            labels[filled:filled + take] = np.where(m, piece, IGNORE_INDEX)
            seg[filled:filled + take] = n_seg
            pos[filled:filled + take] = np.arange(take)
            self._carry_ids, self._carry_mask = self._carry_ids[take:], self._carry_mask[take:]
            filled += take
        if filled == 0:
            return None
        return {"input_ids": ids, "labels": labels, "segment_ids": seg, "positions": pos}

    def __iter__(self) -> "PackedBatches":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        rows = []
        for _ in range(self.batch_size):
            r = self._row()
            if r is None:
                break
            rows.append(r)
        if not rows:
            raise StopIteration
        while len(rows) < self.batch_size:  # last, partial batch of a non-looping stream: pad rows
            rows.append({"input_ids": np.full(self.seq_len, self.pad_id, np.int32),
                         "labels": np.full(self.seq_len, IGNORE_INDEX, np.int32),
                         "segment_ids": np.zeros(self.seq_len, np.int32),
                         "positions": np.zeros(self.seq_len, np.int32)})
        self._batches += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def batches_from_config(train_config: Any, tokenizer: Callable, split: str = "train", *,
                        batch_size: Optional[int] = None, loop: Optional[bool] = None) -> PackedBatches:
    """PackedBatches for a TrainConfig's `data` block (eval: `eval_paths`, else the held-out share)."""
    d = train_config.data
    if split == "eval" and d.eval_paths:
        paths, split_name, frac = d.eval_paths, "all", 0.0
    else:
        paths, split_name, frac = d.paths, split, d.eval_fraction
    return PackedBatches(paths, tokenizer, seq_len=train_config.seq_len,
                         batch_size=batch_size or train_config.batch_size, split=split_name, eval_fraction=frac,
                         text_key=d.text_key, prompt_key=d.prompt_key, completion_key=d.completion_key,
                         completion_only_loss=d.completion_only_loss, add_bos=d.add_bos, add_eos=d.add_eos,
                         shuffle_files=d.shuffle_files, seed=train_config.seed,
                         loop=(split == "train") if loop is None else loop)
