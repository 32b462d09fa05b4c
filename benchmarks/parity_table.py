"""Worst kernel error / tolerance per dtype and quantity over the parity grid (a report).

python benchmarks/parity_table.py [cpu|cuda]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from helpers import DTYPES, check_parity, make_inputs  # noqa: E402


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    worst = {}
    for dname, dtype in DTYPES.items():
        for seqlen in (1, 7, 64, 255, 2053):
            for dstate in (1, 16, 64):
                for b_mode, c_mode in (("var", "var"), ("fixed", "g2"), ("g4", "fixed")):
                    inp = make_inputs(dim=4 if seqlen > 1000 else 8, seqlen=seqlen,
                                      dstate=dstate, dtype=dtype, device=device,
                                      b_mode=b_mode, c_mode=c_mode, has_h0=True)  # fmt: skip
                    rows, _ = check_parity(inp)
                    for name, e, ept, tol in rows:
                        key = (dname, name)
                        if key not in worst or e / tol > worst[key][0] / worst[key][2]:
                            worst[key] = (e, ept, tol)
    names = sorted({k[1] for k in worst}, key=lambda n: (n != "out", n != "last_state", n))
    print("| quantity | " + " | ".join(f"{d} err / ref err / tol" for d in DTYPES) + " |")
    print("| --- | " + " | ".join("---" for _ in DTYPES) + " |")
    for n in names:
        cells = []
        for d in DTYPES:
            e, ept, tol = worst[(d, n)]
            cells.append(f"{e:.2e} / {ept:.2e} / {tol:.2e} ({e / tol:.2f})")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
