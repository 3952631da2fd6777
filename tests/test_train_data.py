"""Data: embedded corpus, byte tokenizer, packing invariants, exact resume, JSONL SFT masks, splits, parquet."""

import json

import numpy as np
import pytest

from iva_jax.train.config import TrainConfig
from iva_jax.train.data import (ByteTokenizer, PackedBatches, batches_from_config, default_corpus_path,
                                in_eval_split, iter_documents)

TOK = ByteTokenizer()


def test_embedded_corpus_ships_and_splits_into_essays():
    path = default_corpus_path()
    text = path.read_text()
    assert len(text.encode()) > 30_000 and text.isascii()
    docs = [d for d, _ in iter_documents(path)]
    assert len(docs) >= 25 and all(len(t) > 500 for _, t in docs)
    assert docs[0][1].startswith("Why the Sky Is Blue")


def test_byte_tokenizer_round_trips():
    s = "naïve café, 3 × 4 = 12"
    ids = TOK(s)
    assert max(ids) < 256 and TOK.decode(ids + [TOK.eos_token_id]) == s


def _unpack(batches):
    """Reassemble the token stream: consecutive pieces of the same document are contiguous."""
    stream = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][r]
            stream += b["input_ids"][r][seg > 0].tolist()
    return stream


def test_packing_invariants_and_content(tmp_path):
    f = tmp_path / "a.txt"
    docs = ["alpha beta gamma", "one two three four five six seven eight nine ten", "x", "tail words here"]
    f.write_text("\n\n".join(docs) + "\n")
    it = PackedBatches([f], TOK, seq_len=13, batch_size=2, loop=False)
    batches = list(it)
    for b in batches:
        ids, lab, seg, pos = b["input_ids"], b["labels"], b["segment_ids"], b["positions"]
        assert ids.shape == lab.shape == seg.shape == pos.shape == (2, 13)
        assert ids.dtype == np.int32
        for r in range(2):
            for s_id in set(seg[r].tolist()) - {0}:
                idx = np.nonzero(seg[r] == s_id)[0]
                assert (np.diff(idx) == 1).all()  # a segment is contiguous
                np.testing.assert_array_equal(pos[r, idx], np.arange(len(idx)))  # positions restart
            assert (lab[r][seg[r] == 0] == -100).all()  # padding is never a target
            np.testing.assert_array_equal(lab[r][seg[r] > 0], ids[r][seg[r] > 0])  # plain text: all trained
    want = []
    for d in docs:
        want += TOK(d) + [TOK.eos_token_id]
    assert _unpack(batches) == want


def test_resume_gives_identical_batches(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}.jsonl"
        p.write_text("".join(json.dumps({"text": f"file {i} doc {j} " + "z" * (j * 7 % 23)}) + "\n" for j in range(9)))
        paths.append(p)
    kw = dict(seq_len=17, batch_size=3, seed=5)
    full = PackedBatches(paths, TOK, **kw)
    ref = [next(full) for _ in range(12)]  # more than one epoch: the file order is reshuffled per epoch
    a = PackedBatches(paths, TOK, **kw)
    for _ in range(5):
        next(a)
    st = json.loads(json.dumps(a.state()))  # JSON round trip, as the checkpoint stores it
    b = PackedBatches(paths, TOK, **kw)
    b.load_state(st)
    for k in range(5, 12):
        got = next(b)
        for key in ref[k]:
            np.testing.assert_array_equal(got[key], ref[k][key], err_msg=f"batch {k} {key}")
    # epochs use different (seeded) file orders; another seed gives another order
    orders = {tuple(p.name for p in full._order(e)) for e in range(4)}
    assert len(orders) > 1
    assert PackedBatches(paths, TOK, seq_len=17, batch_size=3, seed=6)._order(0) != full._order(0) or \
        PackedBatches(paths, TOK, seq_len=17, batch_size=3, seed=6)._order(1) != full._order(1)
    with pytest.raises(ValueError, match=r"data state lacks \['pos'\]"):
        b.load_state({"epoch": 0, "file": 0})


def test_jsonl_prompt_completion_masks_prompt(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text(json.dumps({"prompt": "Q: 2+2?", "completion": " A: 4"}) + "\n")
    b = next(PackedBatches([p], TOK, seq_len=20, batch_size=1, loop=False))
    n_prompt = len(TOK("Q: 2+2?"))
    lab, ids = b["labels"][0], b["input_ids"][0]
    assert (lab[:n_prompt] == -100).all()
    np.testing.assert_array_equal(lab[n_prompt:n_prompt + 5], TOK(" A: 4"))
    assert lab[n_prompt + 5] == TOK.eos_token_id and ids[n_prompt + 5] == TOK.eos_token_id
    both = next(PackedBatches([p], TOK, seq_len=20, batch_size=1, loop=False, completion_only_loss=False))
    assert (both["labels"][0][:n_prompt] >= 0).all()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"neither 'text' nor 'prompt'\+'completion'"):
        next(PackedBatches([bad], TOK, seq_len=8, batch_size=1))


def test_train_and_eval_splits_are_disjoint_and_deterministic():
    cfg = TrainConfig.from_dict({"seq_len": 64, "batch_size": 2, "data": {"eval_fraction": 0.2}})
    with pytest.raises(ValueError, match="must be a DataConfig"):
        TrainConfig(data={"eval_fraction": 0.2})
    docs = [d for d, _ in iter_documents(default_corpus_path())]
    held = [d for d in docs if in_eval_split(d, 0.2)]
    assert 0 < len(held) < len(docs)
    ev = batches_from_config(cfg, TOK, "eval")
    tr = batches_from_config(cfg, TOK, "train")
    ev_text = TOK.decode(_unpack(list(ev)))
    tr_text = TOK.decode(_unpack([next(tr) for _ in range(40)]))
    for _, t in held:
        assert t[:60] in ev_text and t[:60] not in tr_text
    with pytest.raises(ValueError, match="no train documents"):
        next(PackedBatches([default_corpus_path()], TOK, seq_len=8, batch_size=1, split="train",
                           eval_fraction=0.99999))


def test_unsupported_and_parquet_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        PackedBatches([tmp_path / "x.csv"], TOK, seq_len=8, batch_size=1)
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.txt"):
        PackedBatches([tmp_path / "nope.txt"], TOK, seq_len=8, batch_size=1)
    pq_path = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pq_path.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="needs pyarrow"):
            next(PackedBatches([pq_path], TOK, seq_len=8, batch_size=1))
        return
    pq.write_table(pa.table({"text": ["first doc", "second doc"]}), pq_path)
    docs = [d for d, _ in iter_documents(pq_path)]
    assert [t for _, t in docs] == ["first doc", "second doc"]
    assert [t for (_, t), _ in iter_documents(pq_path, start=1)] == ["second doc"]
