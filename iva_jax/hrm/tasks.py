"""Reasoning tasks generated in code (no downloads): Sudoku (4x4, 6x6, 9x9, any br x bc boxes) and mazes.

Token layout follows sapientinc/HRM's dataset builders (0 is PAD and the ignored label id):
  Sudoku: 1 = blank, digit d -> d + 1 (vocab n + 2); inputs are the puzzle, labels the solution.
  Maze:   1 '#' wall, 2 ' ' open, 3 'S' start, 4 'G' goal, 5 'o' path (vocab 6); labels are the
          input grid with the unique shortest path (exclusive of S and G) marked 'o'.
Every Sudoku puzzle has exactly one solution (checked by a solver that counts solutions up to 2);
difficulty is the number of givens (`min_givens`: stop removing clues there; 0 removes every clue
it can).  Train and test are split by solution grid (by maze for mazes), and no augmented training
example reproduces a test solution grid (maze).  Augmentations preserve validity: Sudoku digit
permutation, band / stack permutation, row-in-band and column-in-stack permutation, and transpose
(square boxes only: it would turn 2x3 boxes into 3x2); mazes the 8 dihedral transforms.
Datasets are .npz files (inputs, labels, puzzle_identifiers, group_ids, and a JSON `metadata`).
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

PAD_ID = 0

# ---------------------------------------------------------------------------------------------------
# Sudoku
# ---------------------------------------------------------------------------------------------------


def sudoku_box(n: int) -> Tuple[int, int]:
    """Box (rows, cols) for an n x n Sudoku: the factorisation closest to square, rows <= cols."""
    if n < 1:
        raise ValueError(f"sudoku size must be >= 1, got {n}")
    br = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    if br == 1 and n > 1:
        raise ValueError(f"sudoku size {n} is prime: no box shape")
    return br, n // br


class _Geometry:
    def __init__(self, n: int, box: Tuple[int, int]):
        br, bc = box
        if br * bc != n:
            raise ValueError(f"box {box} does not tile a {n}x{n} grid")
        self.n, self.br, self.bc = n, br, bc
        self.full = (1 << n) - 1
        self.row = [i // n for i in range(n * n)]
        self.col = [i % n for i in range(n * n)]
        self.box = [(r // br) * (n // bc) + c // bc for r, c in zip(self.row, self.col)]


def _search(grid: List[int], geo: _Geometry, limit: int, rng: Optional[np.random.Generator] = None):
    """Backtracking with minimum-remaining-values; returns (solutions counted up to limit, first one)."""
    n = geo.n
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    R, C, X = geo.row, geo.col, geo.box
    for i, v in enumerate(grid):
        if v:
            bit = 1 << (v - 1)
            if (rows[R[i]] | cols[C[i]] | boxes[X[i]]) & bit:
                return 0, None
            rows[R[i]] |= bit
            cols[C[i]] |= bit
            boxes[X[i]] |= bit
    empties = [i for i, v in enumerate(grid) if v == 0]
    grid = list(grid)
    found: List = [0, None]
    full = geo.full

    def rec() -> bool:
        if not empties:
            found[0] += 1
            if found[1] is None:
                found[1] = list(grid)
            return found[0] >= limit
        best, best_mask, best_k = -1, 0, n + 1
        for j, cell in enumerate(empties):
            m = full & ~(rows[R[cell]] | cols[C[cell]] | boxes[X[cell]])
            k = m.bit_count()
            if k < best_k:
                best, best_mask, best_k = j, m, k
                if k <= 1:
                    break
        if best_k == 0:
            return False
        cell = empties[best]
        empties[best] = empties[-1]
        empties.pop()
        digits = [d for d in range(n) if best_mask >> d & 1]
        if rng is not None:
            rng.shuffle(digits)
        r, c, x = R[cell], C[cell], X[cell]
        stop = False
        for d in digits:
            bit = 1 << d
            rows[r] |= bit
            cols[c] |= bit
            boxes[x] |= bit
            grid[cell] = d + 1
            stop = rec()
            rows[r] &= ~bit
            cols[c] &= ~bit
            boxes[x] &= ~bit
            grid[cell] = 0
            if stop:
                break
        empties.append(cell)
        empties[best], empties[-1] = empties[-1], empties[best]
        return stop

    rec()
    return found[0], found[1]


def count_solutions(grid: np.ndarray, box: Optional[Tuple[int, int]] = None, limit: int = 2) -> int:
    """Number of solutions of a Sudoku (0 = blank), counted up to `limit`."""
    grid = np.asarray(grid)
    n = grid.shape[0]
    if grid.shape != (n, n):
        raise ValueError(f"sudoku grid must be square, got {grid.shape}")
    geo = _Geometry(n, box or sudoku_box(n))
    return _search([int(v) for v in grid.reshape(-1)], geo, limit)[0]


def is_valid_solution(grid: np.ndarray, box: Optional[Tuple[int, int]] = None) -> bool:
    """True when every row, column and box holds 1..n exactly once."""
    grid = np.asarray(grid)
    n = grid.shape[0]
    br, bc = box or sudoku_box(n)
    want = set(range(1, n + 1))
    units = [grid[i] for i in range(n)] + [grid[:, j] for j in range(n)]
    units += [grid[r:r + br, c:c + bc].reshape(-1) for r in range(0, n, br) for c in range(0, n, bc)]
    return all(set(u.tolist()) == want for u in units)


def random_solution(n: int, rng: np.random.Generator, box: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A uniformly-shuffled full grid from randomised backtracking."""
    geo = _Geometry(n, box or sudoku_box(n))
    _, sol = _search([0] * (n * n), geo, 1, rng)
    return np.asarray(sol, np.int64).reshape(n, n)


def make_puzzle(solution: np.ndarray, rng: np.random.Generator, min_givens: int = 0,
                box: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Remove clues in random order while the solution stays unique, stopping at `min_givens`."""
    n = solution.shape[0]
    geo = _Geometry(n, box or sudoku_box(n))
    puzzle = [int(v) for v in solution.reshape(-1)]
    givens = n * n
    for cell in rng.permutation(n * n):
        if givens <= min_givens:
            break
        v = puzzle[cell]
        puzzle[cell] = 0
        if _search(puzzle, geo, 2)[0] != 1:
            puzzle[cell] = v
        else:
            givens -= 1
    return np.asarray(puzzle, np.int64).reshape(n, n)


def augment_sudoku(puzzle: np.ndarray, solution: np.ndarray, rng: np.random.Generator,
                   box: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A random validity-preserving symmetry applied to (puzzle, solution), blanks (0) kept."""
    n = puzzle.shape[0]
    br, bc = box or sudoku_box(n)
    digit_map = np.concatenate([[0], rng.permutation(np.arange(1, n + 1))])
    transpose = br == bc and rng.random() < 0.5
    row_perm = np.concatenate([band * br + rng.permutation(br) for band in rng.permutation(n // br)])
    col_perm = np.concatenate([stack * bc + rng.permutation(bc) for stack in rng.permutation(n // bc)])

    def apply(x: np.ndarray) -> np.ndarray:
        if transpose:
            x = x.T
        return digit_map[x[row_perm][:, col_perm]]

    return apply(puzzle), apply(solution)


def build_sudoku(n: int, num_train: int, num_test: int, num_aug: int = 0, min_givens: int = 0,
                 seed: int = 0) -> Dict[str, Tuple[Dict[str, np.ndarray], dict]]:
    """{"train": (arrays, metadata), "test": (...)}: one puzzle per solution grid, train augmented."""
    box = sudoku_box(n)
    rng = np.random.default_rng(seed)
    grids: Dict[bytes, np.ndarray] = {}
    attempts = 0
    while len(grids) < num_train + num_test:
        attempts += 1
        if attempts > 50 * (num_train + num_test) + 1000:
            raise ValueError(f"could not find {num_train + num_test} distinct {n}x{n} solution grids "
                             f"(found {len(grids)}); ask for fewer")
        s = random_solution(n, rng, box)
        grids.setdefault(s.astype(np.uint8).tobytes(), s)
    sols = list(grids.values())
    order = rng.permutation(len(sols))
    test_sols = [sols[i] for i in order[:num_test]]
    train_sols = [sols[i] for i in order[num_test:]]
    test_keys = {s.astype(np.uint8).tobytes() for s in test_sols}

    def encode(examples, groups, name):
        inputs = np.stack([p.reshape(-1) for p, _ in examples]).astype(np.uint8) + 1
        labels = np.stack([s.reshape(-1) for _, s in examples]).astype(np.uint8) + 1
        givens = float(np.mean([(p > 0).sum() for p, _ in examples]))
        arrays = {"inputs": inputs, "labels": labels,
                  "puzzle_identifiers": np.zeros(len(examples), np.int32),
                  "group_ids": np.asarray(groups, np.int32)}
        meta = {"task": "sudoku", "split": name, "size": n, "box": list(box), "seq_len": n * n,
                "vocab_size": n + 2, "pad_id": PAD_ID, "ignore_label_id": PAD_ID, "blank_identifier_id": 0,
                "num_puzzle_identifiers": 1, "total_groups": int(len(set(groups))),
                "num_examples": len(examples), "mean_givens": givens, "min_givens": min_givens,
                "seed": seed, "sets": ["all"]}
        return arrays, meta

    test = [(make_puzzle(s, rng, min_givens, box), s) for s in test_sols]
    train, groups = [], []
    for g, s in enumerate(train_sols):
        p = make_puzzle(s, rng, min_givens, box)
        train.append((p, s))
        groups.append(g)
        for _ in range(num_aug):
            for _try in range(20):
                ap, as_ = augment_sudoku(p, s, rng, box)
                if as_.astype(np.uint8).tobytes() not in test_keys:
                    train.append((ap, as_))
                    groups.append(g)
                    break
    return {"train": encode(train, groups, "train"), "test": encode(test, list(range(len(test))), "test")}


# ---------------------------------------------------------------------------------------------------
# Mazes
# ---------------------------------------------------------------------------------------------------

MAZE_CHARS = "# SGo"  # token = index + 1
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5
_NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def bfs(open_mask: np.ndarray, start: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Distances from `start` over 4-connected open cells (-1 unreachable) and shortest-path counts (capped at 2)."""
    h, w = open_mask.shape
    dist = np.full((h, w), -1, np.int64)
    count = np.zeros((h, w), np.int64)
    dist[start] = 0
    count[start] = 1
    q = deque([start])
    while q:
        r, c = q.popleft()
        for dr, dc in _NEIGHBOURS:
            rr, cc = r + dr, c + dc
            if 0 <= rr < h and 0 <= cc < w and open_mask[rr, cc]:
                if dist[rr, cc] < 0:
                    dist[rr, cc] = dist[r, c] + 1
                    q.append((rr, cc))
                if dist[rr, cc] == dist[r, c] + 1:
                    count[rr, cc] = min(2, count[rr, cc] + count[r, c])
    return dist, count


def shortest_path(open_mask: np.ndarray, start: Tuple[int, int], goal: Tuple[int, int]):
    """(path from start to goal inclusive, number of shortest paths capped at 2); ([], 0) if unreachable."""
    dist, count = bfs(open_mask, start)
    if dist[goal] < 0:
        return [], 0
    path = [goal]
    r, c = goal
    while (r, c) != start:
        for dr, dc in _NEIGHBOURS:
            rr, cc = r + dr, c + dc
            if 0 <= rr < dist.shape[0] and 0 <= cc < dist.shape[1] and dist[rr, cc] == dist[r, c] - 1 \
                    and open_mask[rr, cc]:
                r, c = rr, cc
                break
        path.append((r, c))
    return path[::-1], int(count[goal])


def random_maze(n: int, rng: np.random.Generator, extra_openings: int = 0, min_path_len: int = 0,
                max_tries: int = 200) -> Tuple[np.ndarray, np.ndarray]:
    """(input grid, label grid) tokens [n, n]: a DFS maze with `extra_openings` loops knocked in and
    start/goal whose shortest path is unique and at least `min_path_len` steps long."""
    if n < 3:
        raise ValueError(f"maze side must be >= 3, got {n}")
    m = (n + 1) // 2
    for _ in range(max_tries):
        open_mask = np.zeros((n, n), bool)
        seen = np.zeros((m, m), bool)
        stack = [(int(rng.integers(m)), int(rng.integers(m)))]
        seen[stack[0]] = True
        open_mask[2 * stack[0][0], 2 * stack[0][1]] = True
        while stack:
            i, j = stack[-1]
            nxt = [(i + di, j + dj) for di, dj in _NEIGHBOURS if 0 <= i + di < m and 0 <= j + dj < m
                   and not seen[i + di, j + dj]]
            if not nxt:
                stack.pop()
                continue
            a, b = nxt[int(rng.integers(len(nxt)))]
            seen[a, b] = True
            open_mask[2 * a, 2 * b] = True
            open_mask[i + a, j + b] = True  # the wall between (2i, 2j) and (2a, 2b)
            stack.append((a, b))
        walls = [(r, c) for r in range(n) for c in range(n) if not open_mask[r, c] and (r + c) % 2 == 1
                 and r < 2 * m - 1 and c < 2 * m - 1]
        for k in rng.permutation(len(walls))[:extra_openings]:
            open_mask[walls[k]] = True
        cells = [(2 * i, 2 * j) for i in range(m) for j in range(m)]
        for _pair in range(20):
            s, g = (cells[k] for k in rng.choice(len(cells), 2, replace=False))
            path, npaths = shortest_path(open_mask, s, g)
            if npaths == 1 and len(path) - 1 >= min_path_len:
                inp = np.where(open_mask, OPEN, WALL).astype(np.uint8)
                inp[s], inp[g] = START, GOAL
                lab = inp.copy()
                for cell in path[1:-1]:
                    lab[cell] = PATH
                return inp, lab
    raise ValueError(f"no {n}x{n} maze with a unique shortest path >= {min_path_len} in {max_tries} tries")


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th (0..7) of the 8 rotations / reflections of a square grid."""
    y = np.rot90(x, k % 4)
    return np.fliplr(y) if k >= 4 else y


def build_maze(n: int, num_train: int, num_test: int, num_aug: int = 0, extra_openings: int = 0,
               min_path_len: int = 0, seed: int = 0) -> Dict[str, Tuple[Dict[str, np.ndarray], dict]]:
    """{"train": ..., "test": ...}: distinct mazes (no dihedral image of a test maze in train)."""
    rng = np.random.default_rng(seed)
    mazes, keys = [], set()
    while len(mazes) < num_train + num_test:
        inp, lab = random_maze(n, rng, extra_openings, min_path_len)
        variants = {dihedral(inp, k).tobytes() for k in range(8)}
        if variants & keys:
            continue
        keys |= variants
        mazes.append((inp, lab))
    test, train_src = mazes[:num_test], mazes[num_test:]
    train, groups = [], []
    for g, (inp, lab) in enumerate(train_src):
        for k in [0] + list(rng.permutation(np.arange(1, 8))[:min(num_aug, 7)]):
            train.append((dihedral(inp, k), dihedral(lab, k)))
            groups.append(g)

    def encode(examples, groups, name):
        arrays = {"inputs": np.stack([i.reshape(-1) for i, _ in examples]).astype(np.uint8),
                  "labels": np.stack([l.reshape(-1) for _, l in examples]).astype(np.uint8),
                  "puzzle_identifiers": np.zeros(len(examples), np.int32),
                  "group_ids": np.asarray(groups, np.int32)}
        meta = {"task": "maze", "split": name, "size": n, "seq_len": n * n, "vocab_size": len(MAZE_CHARS) + 1,
                "pad_id": PAD_ID, "ignore_label_id": PAD_ID, "blank_identifier_id": 0,
                "num_puzzle_identifiers": 1, "total_groups": int(len(set(groups))),
                "num_examples": len(examples), "extra_openings": extra_openings, "min_path_len": min_path_len,
                "seed": seed, "charset": MAZE_CHARS, "sets": ["all"]}
        return arrays, meta

    return {"train": encode(train, groups, "train"), "test": encode(test, list(range(len(test))), "test")}


# ---------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------

REQUIRED_KEYS = ("inputs", "labels", "puzzle_identifiers", "group_ids")


def save_dataset(path: str | Path, arrays: Dict[str, np.ndarray], metadata: dict) -> Path:
    """Write arrays + JSON metadata to one .npz file (parent directories created)."""
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"dataset arrays miss {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, metadata=np.asarray(json.dumps(metadata)), **arrays)
    return path


def load_dataset(path: str | Path) -> Tuple[Dict[str, np.ndarray], dict]:
    """(arrays, metadata) from a .npz written by `save_dataset`."""
    with np.load(Path(path), allow_pickle=False) as z:
        meta = json.loads(str(z["metadata"]))
        arrays = {k: z[k] for k in z.files if k != "metadata"}
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{path} is not an HRM dataset: missing {missing}")
    return arrays, meta


def build_task(task: str, size: int, num_train: int, num_test: int, num_aug: int = 0, min_givens: int = 0,
               seed: int = 0, out_dir: Optional[str | Path] = None, **maze_kw):
    """Build a task's train/test split; with `out_dir`, also save train.npz and test.npz there."""
    if task == "sudoku":
        splits = build_sudoku(size, num_train, num_test, num_aug, min_givens, seed)
    elif task == "maze":
        splits = build_maze(size, num_train, num_test, num_aug, seed=seed, **maze_kw)
    else:
        raise ValueError(f"task={task!r} must be 'sudoku' or 'maze'")
    recipe = _recipe(task, size, num_train, num_test, num_aug, min_givens, seed, maze_kw)
    for _, meta in splits.values():
        meta["recipe"] = recipe
    if out_dir is not None:
        for name, (arrays, meta) in splits.items():
            save_dataset(Path(out_dir) / f"{name}.npz", arrays, meta)
    return splits


def _recipe(task, size, num_train, num_test, num_aug, min_givens, seed, maze_kw) -> dict:
    return {"task": task, "size": size, "num_train": num_train, "num_test": num_test, "num_aug": num_aug,
            "min_givens": min_givens if task == "sudoku" else 0, "seed": seed, **dict(sorted(maze_kw.items()))}


def load_or_build(data_dir: str | Path, task: str, size: int, num_train: int, num_test: int, num_aug: int = 0,
                  min_givens: int = 0, seed: int = 0, **maze_kw):
    """train/test from `data_dir` when its recipe matches the arguments; otherwise build and save there."""
    data_dir = Path(data_dir)
    want = _recipe(task, size, num_train, num_test, num_aug, min_givens, seed, maze_kw)
    paths = {name: data_dir / f"{name}.npz" for name in ("train", "test")}
    if all(p.exists() for p in paths.values()):
        splits = {name: load_dataset(p) for name, p in paths.items()}
        if all(meta.get("recipe") == want for _, meta in splits.values()):
            return splits
    return build_task(task, size, num_train, num_test, num_aug, min_givens, seed, out_dir=data_dir, **maze_kw)


def sudoku_grid_of(tokens: Sequence[int], n: int) -> np.ndarray:
    """Tokens (blank 1, digit d+1) back to a grid with 0 = blank."""
    return np.maximum(np.asarray(tokens, np.int64).reshape(n, n) - 1, 0)
