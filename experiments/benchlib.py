"""Timing and bookkeeping shared by the benchmark scripts (profile_kernels, bench_inference, bench_ssm)."""

from __future__ import annotations

import statistics
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np


def guard(label: str, f: Callable[[], Any], on_error: Callable[[str], None], *, limit: int = 3) -> Optional[Any]:
    """f(), or None after printing the failure, a short traceback, and `on_error(message)` (a failing row is
    data, not the end of the run)."""
    try:
        return f()
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e)[:400]}"
        print(f"{label:<66} FAILED: {msg}", flush=True)
        traceback.print_exc(limit=limit)
        on_error(msg)
        return None


def async_ms(fn: Callable, arg_sets: Sequence[tuple], reps: int, inner: int = 5, warm: int = 2) -> float:
    """Median ms per call of `inner` back-to-back async calls between host syncs, rotating `arg_sets`
    (enough distinct inputs defeat the L2)."""
    for i in range(warm):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    ts, n = [], 0
    for _ in range(reps):
        t = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*arg_sets[n % len(arg_sets)])
            n += 1
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) * 1e3 / inner)
    return statistics.median(ts)


def torch_ms(fn: Callable, rep_ms: int = 200) -> float:
    """Median ms of a CUDA torch callable (triton.testing.do_bench: CUDA events, L2 flushed)."""
    import torch
    import triton.testing

    torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def rotations(nbytes_one: int, total: float = 400e6) -> int:
    """How many distinct input sets of `nbytes_one` bytes exceed `total` (the 50 MB L2 serves none twice)."""
    return max(1, int(np.ceil(total / max(nbytes_one, 1))))
