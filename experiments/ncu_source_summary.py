"""Summarize `ncu --page source --csv --print-source sass` output: per kernel, the hot loop's instructions by
opcode and the warp-stall samples by reason and by instruction.
    python experiments/ncu_source_summary.py scan_ncu_source.csv [--top 25] [--kernel 0]
"""
import argparse
import collections
import csv
import io


def kernels(path):
    """[(name, rows)] in the file's order; rows are dicts of the CSV's columns."""
    out, name, buf = [], None, []
    for line in open(path):
        if line.startswith('"Kernel Name"'):
            if name is not None:
                out.append((name, list(csv.DictReader(io.StringIO("".join(buf))))))
            name, buf = line.split(",")[1].strip('"\n'), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        out.append((name, list(csv.DictReader(io.StringIO("".join(buf))))))
    return out


def num(x):
    try:
        return float(x.replace(",", ""))
    except (ValueError, AttributeError):
        return 0.0


def summarize(name, rows, top):
    execs = [num(r["Instructions Executed"]) for r in rows]
    hot = max(execs)
    loop = [r for r, e in zip(rows, execs) if e >= 0.5 * hot]
    samples = sum(num(r["Warp Stall Sampling (All Samples)"]) for r in rows)
    ops = collections.Counter(r["Source"].split()[0].split(".")[0] if not r["Source"].strip().startswith("@")
                              else r["Source"].split()[1].split(".")[0] for r in loop)
    print(f"== {name}: {len(rows)} instructions, hot loop {len(loop)} (executed {hot:.0f} times), {samples:.0f} samples")
    print("   loop opcodes:", ", ".join(f"{k} {v}" for k, v in ops.most_common(18)))
    stall_cols = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    tot = collections.Counter({c[6:]: sum(num(r[c]) for r in rows) for c in stall_cols})
    print("   stalls (share of samples):", ", ".join(f"{k} {100 * v / samples:.1f}%" for k, v in tot.most_common(8) if v))
    print(f"   top {top} instructions by samples:")
    best = sorted(rows, key=lambda r: -num(r["Warp Stall Sampling (All Samples)"]))[:top]
    for r in best:
        why = sorted(((num(r[c]), c[6:]) for c in stall_cols), reverse=True)[:2]
        print(f"   {r['Address'][-5:]} {num(r['Warp Stall Sampling (All Samples)']):6.0f}  "
              f"{' '.join(f'{k}:{v:.0f}' for v, k in why if v):30s} {r['Source'].strip()[:70]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--kernel", type=int, default=None, help="index of one kernel (default all)")
    a = ap.parse_args()
    ks = kernels(a.csv)
    for i, (name, rows) in enumerate(ks):
        if a.kernel is None or a.kernel == i:
            summarize(name, rows, a.top)


if __name__ == "__main__":
    main()
