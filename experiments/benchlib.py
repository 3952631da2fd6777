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


def torch_rms_inputs(rows: int, hidden: int, nrot: int):
    """Rotating random bf16 CUDA inputs for torch's RMSNorm anchors: (next_x, weight), next_x() cycling nrot tensors."""
    import torch

    tx = [torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in range(nrot)]
    tw = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    it = [0]

    def next_x():
        it[0] += 1
        return tx[it[0] % nrot]
    return next_x, tw


def torch_rms_naive(x, w, eps: float = 1e-6):
    """HF LlamaRMSNorm in plain torch ops: the expression the torch.compile anchor compiles."""
    import torch

    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
