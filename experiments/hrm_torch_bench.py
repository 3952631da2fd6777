"""Training steps/s: our JAX HRM train step vs a PyTorch HRM-ACT-v1 step of the same size, same run.

    python experiments/hrm_torch_bench.py --config configs/hrm.yaml [--steps 50] [--compile] \
        [--json runs/hrm_torch_bench.json] [key=value ...]

The PyTorch side is written here from the reference's semantics (sapientinc/HRM): post-norm blocks,
RoPE, SDPA attention (flash on GPU), the one-step gradient under torch.no_grad, the ACT wrapper
with carry reset, exploration and the no-grad Q-target pass, stablemax CE in float64, AdamATan2
(foreach ops) and sign-SGD on the puzzle rows.  Both sides get identical synthetic batches of the
config's shapes; bf16 autocast on the torch side when forward_dtype is bfloat16.  The first
`--warmup` steps (compilation) are not timed.  Prints a table and the ratio jax / torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------ torch HRM
def build_torch(cfg, device):
    import torch
    import torch.nn.functional as F
    from torch import nn

    D, H, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    T = cfg.total_len
    fdt = torch.bfloat16 if cfg.forward_dtype == "bfloat16" else torch.float32  # the carry / residual dtype

    def tn_(w, std):  # truncated at +-2 sigma, rescaled so the result has std `std`
        s = std / 0.8796
        return nn.init.trunc_normal_(w, std=s, a=-2 * s, b=2 * s)

    def lin(i, o, bias=False):
        m = nn.Linear(i, o, bias=bias)
        tn_(m.weight, 1 / math.sqrt(i))
        if bias:
            nn.init.zeros_(m.bias)
        return m

    def rms(x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(x.dtype)

    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    fr = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv)
    emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos(), emb.sin()

    def rope(x):  # [B, T, H, hd]
        xf = x.float()
        rot = torch.cat([-xf[..., hd // 2:], xf[..., :hd // 2]], -1)
        return (xf * cos[:, None] + rot * sin[:, None]).to(x.dtype)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = lin(D, D), lin(D, D), lin(D, D), lin(D, D)
            f = cfg.intermediate_size
            self.gate, self.up, self.down = lin(D, f), lin(D, f), lin(f, D)

        def forward(self, x):
            B = x.shape[0]
            q, k, v = (rope(m(x).view(B, T, H, hd)) if i < 2 else m(x).view(B, T, H, hd)
                       for i, m in enumerate((self.q, self.k, self.v)))
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            x = rms(x + self.o(a.transpose(1, 2).reshape(B, T, D)))
            return rms(x + self.down(F.silu(self.gate(x)) * self.up(x)))

    class Level(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(n)])

        def forward(self, h, inj):
            h = h + inj
            for layer in self.layers:
                h = layer(h).to(fdt)
            return h

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, D)
            tn_(self.embed.weight, 1 / math.sqrt(D))
            self.lm_head, self.q_head = lin(D, cfg.vocab_size), lin(D, 2, bias=True)
            with torch.no_grad():
                self.q_head.weight.zero_()
                self.q_head.bias.fill_(-5)
            self.H, self.L = Level(cfg.H_layers), Level(cfg.L_layers)
            self.register_buffer("H_init", tn_(torch.empty(D), 1.0).to(fdt))
            self.register_buffer("L_init", tn_(torch.empty(D), 1.0).to(fdt))

        def forward(self, zH, zL, inputs, rows):
            x = self.embed(inputs)
            if cfg.puzzle_emb_ndim:
                pe = F.pad(rows, (0, cfg.puzzle_emb_len * D - cfg.puzzle_emb_ndim)).view(-1, cfg.puzzle_emb_len, D)
                x = torch.cat([pe.to(x.dtype), x], 1)
            x = (math.sqrt(D) * x).to(fdt)
            with torch.no_grad():
                for h in range(cfg.H_cycles):
                    for l_ in range(cfg.L_cycles):
                        if not (h == cfg.H_cycles - 1 and l_ == cfg.L_cycles - 1):
                            zL = self.L(zL, zH + x)
                    if h != cfg.H_cycles - 1:
                        zH = self.H(zH, zL)
            zL = self.L(zL, zH + x)
            zH = self.H(zH, zL)
            q = self.q_head(zH[:, 0]).float()
            return zH.detach(), zL.detach(), self.lm_head(zH)[:, cfg.puzzle_emb_len:], q[:, 0], q[:, 1]

    return Inner().to(device)


def torch_runner(cfg, tc, device, compile_model):
    import torch
    import torch.nn.functional as F

    model = build_torch(cfg, device)
    fwd = torch.compile(model) if compile_model else model
    params = [p for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    table = torch.zeros(cfg.num_puzzle_identifiers, cfg.puzzle_emb_ndim, device=device)
    B, T, D = cfg.batch_size, cfg.total_len, cfg.hidden_size
    st = {"zH": torch.zeros(B, T, D, device=device, dtype=model.H_init.dtype),
          "zL": torch.zeros(B, T, D, device=device, dtype=model.H_init.dtype),
          "steps": torch.zeros(B, dtype=torch.int32, device=device), "halted": torch.ones(B, dtype=torch.bool, device=device),
          "data": None, "t": 0}
    amp = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                         enabled=cfg.forward_dtype == "bfloat16")

    def stablemax_ce(logits, labels):
        x = logits.double()
        s = torch.where(x < 0, 1 / (1 - x), x + 1)
        logp = torch.log(s / s.sum(-1, keepdim=True))
        return -logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)

    def step(batch):
        h = st["halted"]
        zH = torch.where(h.view(-1, 1, 1), model.H_init, st["zH"])
        zL = torch.where(h.view(-1, 1, 1), model.L_init, st["zL"])
        data = batch if st["data"] is None else {k: torch.where(h.view((-1,) + (1,) * (x.ndim - 1)), batch[k], x)
                                                 for k, x in st["data"].items()}
        steps = torch.where(h, 0, st["steps"]) + 1
        rows = table[data["puzzle_identifiers"]].clone().requires_grad_(True)
        with amp:
            zH, zL, logits, qh, qc = fwd(zH, zL, data["inputs"], rows)
        with torch.no_grad():
            is_last = steps >= cfg.halt_max_steps
            halted = is_last | (qh > qc)
            explore = (torch.rand_like(qh) < cfg.halt_exploration_prob) * torch.randint_like(
                steps, 2, cfg.halt_max_steps + 1)
            halted = halted & (steps >= explore)
            with amp:
                _, _, _, nqh, nqc = fwd(zH, zL, data["inputs"], rows.detach())
            target = torch.sigmoid(torch.where(is_last, nqh, torch.maximum(nqh, nqc)))
            labels = data["labels"]
            correct = (logits.argmax(-1) == labels).all(-1)
        lm = (stablemax_ce(logits, labels).mean(-1)).sum()
        loss = lm + 0.5 * (F.binary_cross_entropy_with_logits(qh, correct.float(), reduction="sum")
                           + F.binary_cross_entropy_with_logits(qc, target, reduction="sum"))
        (loss / B).backward()
        st["t"] += 1
        t = st["t"]
        lr, b1, b2, wd = tc.lr, tc.beta1, tc.beta2, tc.weight_decay
        with torch.no_grad():
            grads = [p.grad for p in params]
            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, 1 - b2)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            for p, mm, vv in zip(params, m, v):
                p.add_(torch.atan2(mm / bc1, (vv / bc2).sqrt()), alpha=-lr)
                p.grad = None
            if cfg.puzzle_emb_ndim:
                ids = data["puzzle_identifiers"]
                uid, inv = ids.unique(return_inverse=True)
                g = torch.zeros(len(uid), table.shape[1], device=device).index_add_(0, inv, rows.grad)
                lr_e, wd_e = tc.puzzle_emb_lr, tc.puzzle_emb_weight_decay
                table[uid] = table[uid] * (1 - lr_e * wd_e) - lr_e * g.sign()
        st.update(zH=zH, zL=zL, steps=steps, halted=halted, data=data)
        return loss

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step, sync, sum(p.numel() for p in params)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/hrm.yaml")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the torch model")
    p.add_argument("--seq_len", type=int, default=36, help="task length (6x6 Sudoku: 36)")
    p.add_argument("--vocab_size", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from iva_jax.hrm.config import load_train_config

    tc = load_train_config(args.config, args.overrides)
    cfg = tc.model.replace(seq_len=args.seq_len, vocab_size=args.vocab_size)
    tc = tc.replace(model=cfg)
    B = cfg.batch_size
    rng = np.random.default_rng(0)
    batches = [{"inputs": rng.integers(1, args.vocab_size, (B, args.seq_len)).astype(np.int32),
                "labels": rng.integers(2, args.vocab_size, (B, args.seq_len)).astype(np.int32),
                "puzzle_identifiers": np.zeros(B, np.int32)} for _ in range(4)]
    results = {}

    # ---- JAX (the library's train step)
    import jax
    if tc.stablemax_x64:
        jax.config.update("jax_enable_x64", True)
    from iva_jax.hrm import train as T
    from iva_jax.hrm.model import HRMACT

    model = HRMACT(cfg)
    state = T.init_train_state(model, tc, jax.random.PRNGKey(0))
    step = jax.jit(T.make_train_step(model, tc), donate_argnums=(0,) if jax.default_backend() != "cpu" else ())
    jb = [jax.device_put(b) for b in batches]
    t = time.time()
    for i in range(args.warmup):
        state, sums = step(state, jb[i % 4])
    jax.block_until_ready(sums)
    compile_s = time.time() - t
    t = time.time()
    for i in range(args.steps):
        state, sums = step(state, jb[i % 4])
    jax.block_until_ready(sums)
    results["jax"] = {"steps_per_s": args.steps / (time.time() - t), "warmup_s": compile_s,
                      "params": T.param_count(state.params), "device": jax.devices()[0].device_kind}

    # ---- PyTorch
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tstep, sync, n_params = torch_runner(cfg, tc, device, args.compile)
        tb = [{k: torch.from_numpy(v).to(device) for k, v in b.items()} for b in batches]
        t = time.time()
        for i in range(args.warmup):
            tstep(tb[i % 4])
        sync()
        warm = time.time() - t
        t = time.time()
        for i in range(args.steps):
            tstep(tb[i % 4])
        sync()
        results["torch"] = {"steps_per_s": args.steps / (time.time() - t), "warmup_s": warm, "params": n_params,
                            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                            "compiled": args.compile, "version": torch.__version__}
    print("| impl | params | steps/s | warmup s | device |\n|---|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {r['params']:,} | {r['steps_per_s']:.2f} | {r['warmup_s']:.1f} | {r['device']} |")
    if "torch" in results:
        results["jax_over_torch"] = results["jax"]["steps_per_s"] / results["torch"]["steps_per_s"]
        print(f"jax / torch steps/s: {results['jax_over_torch']:.2f}")
    results["config"] = tc.to_dict()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
