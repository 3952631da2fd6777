"""See what Triton makes of a Pallas (Triton-lowered) kernel, on a machine without a GPU.

Lowers a jitted function for CUDA with `jax.export` (Pallas' Triton lowering runs on CPU and hands each kernel's
TTIR to a custom call), captures every kernel's TTIR, compiles it with a separately installed Triton (default
3.6, the GPU machine's version) for sm90, and reports per kernel:
    registers and spills (the bundled ptxas -v), shared memory,
    TTGIR `ttg.convert_layout` ops in total and inside `scf.for` bodies (a convert that moves data between
        threads is a shuffle or a shared-memory round trip, with a barrier when it crosses warps),
    PTX bar.sync count,
    SASS of the hottest loop (the largest backward branch's body): instructions by opcode (MUFU, SHFL, BAR,
        LDG, STG, LDS/STS, FFMA ...) and, given the steps one trip walks, instructions per step.

Issue rate is what bounds a latency-free recurrence kernel: instructions per step per warp x warps per SM
sub-partition ~ cycles per step.

Setup (once; not a project dependency):  pip install --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=. python experiments/triton_offline.py                               # the default config, bf16
    PYTHONPATH=. python experiments/triton_offline.py --config '{"block_d": 32}' --dtype float32 --dump /tmp/d
    PYTHONPATH=. python experiments/triton_offline.py --sweep '[{}, {"block_d": 32}]' --grad
Library use: `capture(fn, *shape_dtype_structs)` -> kernels (name, num_warps, num_stages, ttir);
`compile_kernel(kernel)` -> dict of artifacts; `analyze(artifacts, steps_per_trip)` -> dict of numbers.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

TRITON_PATH = os.environ.get("TRITON_OFFLINE_PATH", "/tmp/triton36")


# ---------------------------------------------------------------------------------------------
# capture: jax -> TTIR of every Pallas Triton kernel
# ---------------------------------------------------------------------------------------------
def capture(fn, *args) -> list[dict]:
    """Lower jax.jit(fn)(*args) for CUDA (no GPU needed); returns one dict per Pallas Triton kernel:
    name, num_warps, num_stages, ttir (the module's text)."""
    import jax
    from jax import export
    from jax._src.pallas.triton import lowering as tl

    kernels = []
    orig = tl.lower_jaxpr_to_triton_module

    def spy(*a, **k):
        res = orig(*a, **k)
        caller = sys._getframe(1).f_locals  # pallas_call_lowering: its name / num_warps / num_stages
        kernels.append(dict(name=caller.get("name", f"kernel{len(kernels)}"), num_warps=caller.get("num_warps", 4),
                            num_stages=caller.get("num_stages", 3), ttir=res.module.operation.get_asm()))
        return res

    tl.lower_jaxpr_to_triton_module = spy
    try:
        export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    finally:
        tl.lower_jaxpr_to_triton_module = orig
    return kernels


# ---------------------------------------------------------------------------------------------
# compile: TTIR -> TTGIR / LLIR / PTX / cubin / SASS with an offline Triton
# ---------------------------------------------------------------------------------------------
def _triton():
    if TRITON_PATH not in sys.path:
        sys.path.insert(0, TRITON_PATH)
    import triton  # noqa: F401  (the offline install; the project venv has none)
    return triton


def _bin(tool: str) -> str:
    return os.path.join(TRITON_PATH, "triton", "backends", "nvidia", "bin", tool)


def compile_kernel(kernel: dict, arch: int = 90, fp_fusion: bool = False) -> dict:
    """Compile one captured kernel for cuda:arch; fp_fusion False (default) compiles as XLA's Triton path does on
    the GPU, with no contraction of a multiply and an add into an FMA (Nsight Compute on the H100, jax 0.11: 0
    fused FP32 instructions in the scan forward; Triton's own default contracts).  Returns ttir, ttgir, llir, ptx,
    sass (text), ptxas (the -v report), regs, spills (bytes stored + loaded), shared (bytes), compile_s."""
    triton = _triton()
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "triton_offline_cache"))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{kernel['name']}.ttir")
        with open(src, "w") as fh:
            fh.write(kernel["ttir"])
        t = time.perf_counter()
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=kernel["num_warps"], num_stages=kernel["num_stages"],
                                        enable_fp_fusion=fp_fusion))
        compile_s = time.perf_counter() - t
        ptx, cubin = k.asm["ptx"], k.asm["cubin"]
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as fh:
            fh.write(ptx)
        with open(cubin_path, "wb") as fh:
            fh.write(cubin)
        sm = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
        rep = subprocess.run([_bin("ptxas"), "-v", f"-arch={sm}", ptx_path, "-o", os.path.join(tmp, "v.cubin")],
                             capture_output=True, text=True).stderr
        sass = subprocess.run([_bin("cuobjdump"), "-sass", cubin_path], capture_output=True, text=True).stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, rep)) else 0  # noqa: E731
    return dict(name=kernel["name"], num_warps=kernel["num_warps"], ttir=kernel["ttir"], ttgir=k.asm["ttgir"],
                llir=k.asm["llir"], ptx=ptx, sass=sass, ptxas=rep, regs=num(r"Used (\d+) registers"),
                spills=num(r"(\d+) bytes spill stores") + num(r"(\d+) bytes spill loads"),
                shared=int(getattr(k.metadata, "shared", 0) or 0), compile_s=round(compile_s, 1))


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------
def ttgir_converts(ttgir: str) -> dict:
    """convert_layout ops in total, inside scf.for bodies, and the (from -> to) layouts of the in-loop ones."""
    stack, total, in_loop, kinds = [], 0, 0, collections.Counter()
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("}"):
            if stack:
                stack.pop()
        if "ttg.convert_layout" in s:
            total += 1
            if "for" in stack:
                in_loop += 1
                m = re.search(r":\s*tensor<([^>]*(?:<[^>]*>[^>]*)*)>\s*->\s*tensor<(.*)>", s)
                kinds[(m.group(1), m.group(2)) if m else s] += 1
        if s.endswith("{") and not s.startswith("}"):
            stack.append("for" if "scf.for" in s else "other")
        elif s.startswith("}") and s.endswith("{"):  # "} else {"
            stack.append("other")
    return dict(converts=total, converts_in_loop=in_loop, convert_kinds=dict(kinds))


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[\w.]*)?\s*([^;]*);")


def sass_loops(sass: str) -> list[dict]:
    """Loops of the SASS (backward branches), largest body first: start, end, instructions, opcode counts."""
    ins = [(int(m.group(1), 16), m.group(3), m.group(3) + (m.group(4) or ""), m.group(5))
           for m in _SASS.finditer(sass)]
    loops = []
    for addr, op, _, operands in ins:
        if op == "BRA" and (t := re.match(r"\s*`?\(?\.?L?_?x?_?(0x[0-9a-f]+)", operands)):
            target = int(t.group(1), 16)
            if target < addr:
                body = [i for i in ins if target <= i[0] <= addr]
                loops.append(dict(start=target, end=addr, n=len(body),
                                  ops=collections.Counter(i[1] for i in body),
                                  full_ops=collections.Counter(i[2] for i in body)))
    return sorted(loops, key=lambda lp: -lp["n"])


KEY_OPS = ("MUFU", "MOV", "SHFL", "BAR", "LDG", "STG", "LDS", "STS", "FFMA", "FMUL", "FADD", "PRMT", "SHF", "IMAD",
           "IADD3", "ATOMG", "RED")


def analyze(art: dict, steps_per_trip: int | None = None) -> dict:
    """Numbers of one compiled kernel (see the module docstring)."""
    out = dict(name=art["name"], warps=art["num_warps"], regs=art["regs"], spills=art["spills"],
               shared=art["shared"], compile_s=art["compile_s"])
    out.update(ttgir_converts(art["ttgir"]))
    out["bar_sync_ptx"] = len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", art["ptx"]))
    loops = sass_loops(art["sass"])
    if loops:
        lp = loops[0]
        out["loop_instrs"] = lp["n"]
        out["loop_ops"] = {k: lp["ops"].get(k, 0) for k in KEY_OPS if lp["ops"].get(k, 0)}
        if steps_per_trip:
            out["instrs_per_step"] = round(lp["n"] / steps_per_trip, 1)
    return out


def dump(arts: list[dict], where: str) -> None:
    os.makedirs(where, exist_ok=True)
    for a in arts:
        for ext in ("ttir", "ttgir", "llir", "ptx", "sass"):
            with open(os.path.join(where, f"{a['name']}.{ext}"), "w") as fh:
                fh.write(a[ext])


def report(results: list[dict]) -> None:
    for r in results:
        ops = " ".join(f"{k}={v}" for k, v in r.get("loop_ops", {}).items())
        print(f"  {r['name']:<24} warps={r['warps']} regs={r['regs']} spills={r['spills']} smem={r['shared']} "
              f"converts={r['converts']} (in loop {r['converts_in_loop']}) bar.sync={r['bar_sync_ptx']} "
              f"loop={r.get('loop_instrs')} instr ({r.get('instrs_per_step')}/step) [{ops}] "
              f"compile {r['compile_s']} s", flush=True)
        for (src, dst), n in r.get("convert_kinds", {}).items():
            print(f"      {n} x convert {src}  ->  {dst}")


# ---------------------------------------------------------------------------------------------
# the selective-scan kernels
# ---------------------------------------------------------------------------------------------
def selective_scan_kernels(config: dict, dtype: str = "bfloat16", grad: bool = False, b: int = 8, l: int = 4096,
                           d: int = 2048, n: int = 16, g: int = 1) -> list[dict]:
    """Captured kernels of kernels.selective_scan at a Mamba shape (z, D, delta_bias, softplus on)."""
    import importlib

    import jax
    import jax.numpy as jnp

    K = importlib.import_module("kernels.selective_scan")
    act, f32, sd = jnp.dtype(dtype), jnp.float32, jax.ShapeDtypeStruct
    args = (sd((b, l, d), act), sd((b, l, d), act), sd((d, n), f32), sd((b, l, g, n), act), sd((b, l, g, n), act),
            sd((d,), f32), sd((b, l, d), act), sd((d,), f32))
    cfg = K.ScanBlockConfig(**config)

    def fwd(*a):
        return K.selective_scan_triton(*a, delta_softplus=True, config=cfg)

    if grad:
        def fn(*a):
            return jax.grad(lambda *x: fwd(*x)[0].astype(f32).sum() + fwd(*x)[1].sum(), argnums=tuple(range(8)))(*a)
    else:
        def fn(*a):
            return fwd(*a)[0]
    return capture(fn, *args)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="{}", help="ScanBlockConfig overrides (JSON)")
    ap.add_argument("--sweep", default=None, help="JSON list of ScanBlockConfig overrides (instead of --config)")
    ap.add_argument("--dtype", default="bfloat16", help="activation dtype, or a comma list")
    ap.add_argument("--grad", action="store_true", help="also the backward (and the checkpointing forward)")
    ap.add_argument("--shape", default="8,4096,2048,16", help="batch,seqlen,dim,dstate")
    ap.add_argument("--dump", default=None, help="directory for the TTIR/TTGIR/LLIR/PTX/SASS of every kernel")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()
    b, l, d, n = map(int, args.shape.split(","))
    configs = json.loads(args.sweep) if args.sweep else [json.loads(args.config)]
    rows = []
    for dtype in args.dtype.split(","):
        for cfg in configs:
            print(f"{dtype} {cfg or 'default'}", flush=True)
            try:
                kernels = selective_scan_kernels(cfg, dtype, args.grad, b, l, d, n)
                arts = [compile_kernel(k) for k in kernels]
            except Exception as e:  # noqa: BLE001  (report and go on with the sweep)
                print(f"  FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                rows.append(dict(dtype=dtype, config=cfg, error=str(e)[:2000]))
                continue
            chunk = cfg.get("chunk", 4)
            res = [analyze(a, chunk if a["name"] in ("selective_scan_fwd", "selective_scan_state") else None)
                   for a in arts]
            report(res)
            rows += [dict(dtype=dtype, config=cfg, **r) for r in res]
            if args.dump:
                tag = "_".join(f"{k}{v}" for k, v in cfg.items()) or "default"
                dump(arts, os.path.join(args.dump, f"{dtype}_{tag}"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
