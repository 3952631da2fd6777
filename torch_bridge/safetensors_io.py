"""Read and write HF safetensors checkpoints (single file or sharded with an index) without torch."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Tuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_checkpoint(path: str | Path) -> Tuple[List[str], Callable[[str], np.ndarray]]:
    """(tensor names, getter) for an HF directory; FileNotFoundError names what is missing."""
    d = Path(path)
    if (d / INDEX).exists():
        index = json.loads((d / INDEX).read_text())
        weight_map: Dict[str, str] = index.get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (d / f).exists()]
        if missing:
            raise FileNotFoundError(f"{d}: shards listed in {INDEX} are missing: {missing}")
    elif (d / SINGLE).exists():
        with safe_open(str(d / SINGLE), framework="numpy") as f:
            weight_map = {k: SINGLE for k in f.keys()}
    else:
        found = sorted(p.name for p in d.glob("*"))[:20]
        raise FileNotFoundError(f"{d}: no {SINGLE} or {INDEX} (found: {found})")
    handles: Dict[str, object] = {}

    def get(name: str) -> np.ndarray:
        fname = weight_map[name]
        if fname not in handles:
            handles[fname] = safe_open(str(d / fname), framework="numpy")
        return handles[fname].get_tensor(name)

    return list(weight_map), get


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_checkpoint(tensors: Mapping[str, np.ndarray], out_dir: str | Path,
                     max_shard_size: int | str = "5GB") -> List[str]:
    """Write tensors as model.safetensors, or shards + index above `max_shard_size`; returns file names.

    Each file is written to a temporary name and renamed into place, so a crash never leaves a
    half-written checkpoint file behind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: List[Dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        nbytes = arr.nbytes
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        names = [SINGLE]
    else:
        n = len(shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for fname, shard in zip(names, shards):
        _atomic(out / fname, lambda p, s=shard: save_file(dict(s), str(p), metadata=meta))
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        _atomic(out / INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    return names


def _atomic(target: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=str(target.parent))
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
