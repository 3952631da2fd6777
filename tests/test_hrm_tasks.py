"""Generated tasks: Sudoku uniqueness / augmentation validity / split, maze BFS optimality, storage, batches."""

import itertools

import numpy as np
import pytest

from iva_jax.hrm import tasks
from iva_jax.hrm.data import PuzzleBatcher
from iva_jax.hrm.losses import IGNORE_LABEL_ID


def all_4x4_grids():
    """Brute force: every valid 4x4 Sudoku grid (independent of the solver under test)."""
    rows = list(itertools.permutations(range(1, 5)))
    out = []

    def extend(prefix):
        if len(prefix) == 4:
            g = np.array(prefix)
            if tasks.is_valid_solution(g, (2, 2)):
                out.append(g)
            return
        for r in rows:  # prune on columns only; boxes are checked at the end
            if all(r[j] != p[j] for p in prefix for j in range(4)):
                extend(prefix + [r])

    extend([])
    return out


@pytest.fixture(scope="module")
def grids4():
    return all_4x4_grids()


def test_4x4_solution_count_matches_brute_force(grids4):
    assert len(grids4) == 288  # the known number of 4x4 Sudoku grids
    rng = np.random.default_rng(0)
    for _ in range(25):
        sol = grids4[rng.integers(len(grids4))]
        mask = rng.random((4, 4)) < 0.35
        puzzle = np.where(mask, sol, 0)
        brute = sum(bool(np.all((puzzle == 0) | (puzzle == g))) for g in grids4)
        assert tasks.count_solutions(puzzle, limit=1000) == brute
        assert tasks.count_solutions(puzzle, limit=2) == min(brute, 2)
    bad = np.zeros((4, 4), int)
    bad[0, 0] = bad[0, 1] = 3
    assert tasks.count_solutions(bad) == 0


@pytest.mark.parametrize("n,box,num", [(4, (2, 2), 6), (6, (2, 3), 6), (9, (3, 3), 2)])
def test_sudoku_unique_and_augmentations_valid(n, box, num):
    rng = np.random.default_rng(n)
    assert tasks.sudoku_box(n) == box
    for _ in range(num):
        sol = tasks.random_solution(n, rng)
        assert tasks.is_valid_solution(sol, box)
        puzzle = tasks.make_puzzle(sol, rng)
        assert np.all((puzzle == 0) | (puzzle == sol))
        assert tasks.count_solutions(puzzle) == 1
        # minimal: putting back nothing and removing any single remaining clue breaks uniqueness
        givens = np.argwhere(puzzle > 0)
        r, c = givens[rng.integers(len(givens))]
        weaker = puzzle.copy()
        weaker[r, c] = 0
        assert tasks.count_solutions(weaker) == 2
        for _ in range(4):
            ap, asol = tasks.augment_sudoku(puzzle, sol, rng)
            assert tasks.is_valid_solution(asol, box)
            assert np.all((ap == 0) | (ap == asol)) and (ap > 0).sum() == (puzzle > 0).sum()
            assert tasks.count_solutions(ap) == 1


def test_difficulty_knob_and_transpose_only_for_square_boxes():
    rng = np.random.default_rng(3)
    sol = tasks.random_solution(6, rng)
    easy = tasks.make_puzzle(sol, rng, min_givens=24)
    assert (easy > 0).sum() == 24 and tasks.count_solutions(easy) == 1
    # a 6x6 transpose breaks the 2x3 boxes (which is why the augmentation never transposes them)
    assert not tasks.is_valid_solution(sol.T, (2, 3))
    for _ in range(20):
        _, asol = tasks.augment_sudoku(sol, sol, rng)
        assert tasks.is_valid_solution(asol, (2, 3))


def test_sudoku_dataset_split_and_storage(tmp_path):
    splits = tasks.build_task("sudoku", 4, num_train=30, num_test=12, num_aug=5, seed=1, out_dir=tmp_path)
    (tr, trm), (te, tem) = splits["train"], splits["test"]
    assert trm["vocab_size"] == 6 and trm["seq_len"] == 16 and tem["num_examples"] == 12
    assert tr["inputs"].min() >= 1 and tr["labels"].min() >= 2 and tr["labels"].max() <= 5
    test_grids = {bytes(x) for x in te["labels"]}
    assert len(test_grids) == 12
    assert not test_grids & {bytes(x) for x in tr["labels"]}  # no solution grid in both splits
    assert len(tr["inputs"]) > 30 and set(tr["group_ids"]) == set(range(30))
    for inp, lab in zip(te["inputs"], te["labels"]):
        assert tasks.count_solutions(tasks.sudoku_grid_of(inp, 4)) == 1
        assert tasks.is_valid_solution(tasks.sudoku_grid_of(lab, 4))
    arrays, meta = tasks.load_dataset(tmp_path / "train.npz")
    assert meta == trm and all(np.array_equal(arrays[k], tr[k]) for k in tr)
    again = tasks.load_or_build(tmp_path, "sudoku", 4, 30, 12, 5, seed=1)  # cached: same recipe
    assert np.array_equal(again["test"][0]["inputs"], te["inputs"])
    with pytest.raises(ValueError, match="distinct"):
        tasks.build_sudoku(4, 300, 10)  # only 288 grids exist


def reference_distances(open_mask, start):
    """Bellman-Ford style relaxation (independent of the BFS under test)."""
    h, w = open_mask.shape
    d = np.full((h, w), np.inf)
    d[start] = 0
    for _ in range(h * w):
        nd = d.copy()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            shifted = np.full((h, w), np.inf)
            src = d[max(-dr, 0):h - max(dr, 0), max(-dc, 0):w - max(dc, 0)]
            shifted[max(dr, 0):h - max(-dr, 0), max(dc, 0):w - max(-dc, 0)] = src + 1
            nd = np.minimum(nd, shifted)
        nd[~open_mask] = np.inf
        if np.array_equal(nd, d):
            break
        d = nd
    return d


@pytest.mark.parametrize("n,extra", [(9, 0), (11, 4)])
def test_maze_labels_are_unique_shortest_paths(n, extra):
    splits = tasks.build_maze(n, num_train=6, num_test=3, num_aug=3, extra_openings=extra, min_path_len=6, seed=n)
    (tr, _), (te, tem) = splits["train"], splits["test"]
    assert tem["vocab_size"] == 6
    for inp, lab in list(zip(tr["inputs"], tr["labels"])) + list(zip(te["inputs"], te["labels"])):
        inp, lab = inp.reshape(n, n), lab.reshape(n, n)
        s = tuple(np.argwhere(inp == tasks.START)[0])
        g = tuple(np.argwhere(inp == tasks.GOAL)[0])
        open_mask = inp != tasks.WALL
        assert np.array_equal(lab != tasks.PATH, inp == lab)  # labels only add path marks
        path = np.argwhere(lab == tasks.PATH)
        d = reference_distances(open_mask, s)
        assert len(path) + 1 == d[g] >= 6  # as many steps as the shortest distance
        cells = {tuple(p) for p in path} | {s, g}
        # the marked cells form a connected path from s to g with each cell one step further from s
        dist = sorted(d[c] for c in cells)
        assert dist == list(range(int(d[g]) + 1))
        for c in cells - {s}:
            assert any((c[0] + dr, c[1] + dc) in cells and d[c[0] + dr, c[1] + dc] == d[c] - 1
                       for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))
    test_set = {bytes(x) for x in te["inputs"]}
    assert not test_set & {bytes(x) for x in tr["inputs"]}


def test_batcher_is_deterministic_and_covers_groups():
    splits = tasks.build_sudoku(4, 10, 5, num_aug=3, seed=2)
    (tr, trm), (te, tem) = splits["train"], splits["test"]
    b = PuzzleBatcher(tr, trm, batch_size=4, seed=7)
    b2 = PuzzleBatcher(tr, trm, batch_size=4, seed=7)
    batches = [b.train_batch(i) for i in range(5)]  # 20 positions = 2 epochs of 10 groups
    assert all(np.array_equal(x["inputs"], b2.train_batch(i)["inputs"]) for i, x in enumerate(batches))
    for e in range(2):  # each epoch visits every group once, one member each, in batch order
        idx = b._epoch(e)
        assert sorted(tr["group_ids"][idx]) == list(range(10))
        got = np.concatenate([x["inputs"] for x in batches])[10 * e:10 * (e + 1)]
        assert np.array_equal(got, tr["inputs"][idx].astype(np.int32))
    assert not np.array_equal(b._epoch(0), b._epoch(1))
    ev = list(PuzzleBatcher(te, tem, batch_size=4).eval_batches())
    assert len(ev) == 2 and np.all(ev[1]["labels"][1:] == IGNORE_LABEL_ID) and np.all(ev[1]["inputs"][1:] == 0)
