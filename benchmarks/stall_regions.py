"""Aggregate Nsight Compute source-page CSV (benchmarks/profile_source.sh) per kernel: warp-stall
samples by reason, the hottest instructions, and samples per opcode.

    python benchmarks/stall_regions.py benchmarks/results/ncu_source_0.csv [top]
"""

from __future__ import annotations

import csv
import re
import sys
from collections import Counter, defaultdict


def kernels(path):
    rows, name, header = defaultdict(list), None, None
    with open(path, newline="") as f:
        for rec in csv.reader(f):
            if len(rec) >= 2 and rec[0] == "Kernel Name":
                name, header = rec[1], None
            elif rec and rec[0] == "Address":
                header = rec
            elif header and name and len(rec) == len(header):
                rows[name].append(dict(zip(header, rec)))
    return rows


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    for name, rows in kernels(path).items():
        total = sum(num(r["Warp Stall Sampling (All Samples)"]) for r in rows)
        insts = sum(num(r["Instructions Executed"]) for r in rows)
        reasons = Counter()
        for r in rows:
            for k, v in r.items():
                if k.startswith("stall_") and "Not Issued" not in k:
                    reasons[k[6:]] += num(v)
        print(f"## {name}: {total:.0f} samples, {insts:.3g} warp instructions")
        print("   " + ", ".join(f"{k} {v / total:.1%}" for k, v in reasons.most_common(10)))
        ops = Counter()
        for r in rows:
            op = re.sub(r"^@!?U?P\w+\s+", "", r["Source"].strip()).split(" ")[0]
            ops[op] += num(r["Warp Stall Sampling (All Samples)"])
        print("   by opcode: " + ", ".join(f"{k} {v / total:.1%}" for k, v in ops.most_common(14)))
        hot = sorted(rows, key=lambda r: -num(r["Warp Stall Sampling (All Samples)"]))[:top]
        for r in hot:
            rs = {
                k[6:]: num(v)
                for k, v in r.items()
                if k.startswith("stall_") and "Not Issued" not in k
            }
            main_r = ", ".join(
                f"{k} {v:.0f}" for k, v in sorted(rs.items(), key=lambda x: -x[1])[:3] if v
            )
            print(
                f"   {r['Address']:>6} {num(r['Warp Stall Sampling (All Samples)']):7.0f} "
                f"{r['Source'].strip()[:60]:60s} [{main_r}]"
            )


if __name__ == "__main__":
    main()
