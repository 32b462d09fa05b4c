"""Train the synthetic-task models (benchmarks/tasks/models.py) on freshly generated batches
(benchmarks/tasks/data.py) and evaluate them.

    python -m benchmarks.tasks.train --task selective_copying --kind s6 --steps 4000
    python -m benchmarks.tasks.train --task induction_heads --kind s6 --seqlen 256 \\
        --eval-lengths 64,128,...,1048576
    python -m benchmarks.tasks.train ... --smoke      # tiny, CPU, seconds

Seeded (the model's initialisation and every batch); ``--checkpoint FILE`` saves the model,
optimiser and step every ``--save-every`` steps and resumes from it. Writes the training curve
(JSON, and PNG when matplotlib is present) and an accuracy table to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from .data import TASKS
from .models import TaskModel, masked_loss_and_accuracy


def evaluate(model, task, seqlen, batches, batch, gen, device, n_memorize=16, vocab=16):
    model.eval()
    accs = []
    with torch.no_grad():
        for _ in range(batches):
            kw = {"n_memorize": n_memorize} if task == "selective_copying" else {}
            x, y, m = TASKS[task](batch, seqlen, vocab=vocab, generator=gen, device=device, **kw)
            with torch.autocast(device_type=device, dtype=torch.bfloat16,
                                enabled=device == "cuda"):  # fmt: skip
                _, acc = masked_loss_and_accuracy(model(x), y, m)
            accs.append(acc.item())
    model.train()
    return sum(accs) / len(accs)


def run(task="selective_copying", kind="s6", seqlen=4096, n_memorize=16, vocab=16, d_model=64,
        n_layers=2, d_state=16, steps=4000, batch=64, lr=1e-3, seed=0, device="cpu",
        eval_every=500, eval_batches=4, checkpoint=None, save_every=500, max_seconds=None,
        log=print):  # fmt: skip
    """Train; returns {"curve": [(step, loss, acc)], "eval": [(step, acc)], "model": model}."""
    torch.manual_seed(seed)
    model = TaskModel(vocab, d_model, n_layers, d_state, kind).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    start, curve, evals = 0, [], []
    if checkpoint and os.path.exists(checkpoint):
        ck = torch.load(checkpoint, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start, curve, evals = ck["step"], ck["curve"], ck["eval"]
        log(f"resumed at step {start}")
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )  # fmt: skip
    for _ in range(start):
        sched.step()
    t0 = time.perf_counter()
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        kw = {"n_memorize": n_memorize} if task == "selective_copying" else {}
        x, y, m = TASKS[task](batch, seqlen, vocab=vocab, generator=gen, device=device, **kw)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, acc = masked_loss_and_accuracy(model(x), y, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append((step + 1, loss.item(), acc.item()))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            egen = torch.Generator().manual_seed(10**9 + step)
            ea = evaluate(model, task, seqlen, eval_batches, batch, egen, device, n_memorize,
                          vocab)  # fmt: skip
            evals.append((step + 1, ea))
            log(f"step {step + 1}: loss {loss.item():.4f} train acc {acc.item():.3f} "
                f"eval acc {ea:.4f} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        out_of_time = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        if out_of_time and not evals or out_of_time and evals[-1][0] != step + 1:
            egen = torch.Generator().manual_seed(10**9 + step)
            evals.append((step + 1, evaluate(model, task, seqlen, eval_batches, batch, egen,
                                             device, n_memorize, vocab)))  # fmt: skip
            log(f"stopped at step {step + 1} after {max_seconds} s: eval acc {evals[-1][1]:.4f}")
        if checkpoint and ((step + 1) % save_every == 0 or out_of_time):
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "curve": curve, "eval": evals}, checkpoint)  # fmt: skip
        if out_of_time:
            break
    return {"curve": curve, "eval": evals, "model": model}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="selective_copying", choices=sorted(TASKS))
    ap.add_argument("--kind", default="s6", choices=["s6", "lti"])
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-lengths", default="")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT", "benchmarks/results"))
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    seqlen = a.seqlen or (4096 if a.task == "selective_copying" else 256)
    cfg = dict(task=a.task, kind=a.kind, seqlen=seqlen, steps=a.steps, batch=a.batch, lr=a.lr,
               seed=a.seed, device=a.device, checkpoint=a.checkpoint,
               max_seconds=a.max_seconds)  # fmt: skip
    if a.smoke:
        cfg.update(SMOKE[a.task], device="cpu")
    res = run(**cfg)
    name = f"tasks_{a.task}_{a.kind}"
    os.makedirs(a.out, exist_ok=True)
    rows = [("train length", cfg["seqlen"], res["eval"][-1][1])]
    for L in [int(v) for v in a.eval_lengths.split(",") if v]:
        gen = torch.Generator().manual_seed(7 + L)
        b = max(1, min(a.batch, (1 << 21) // L))
        try:
            acc = evaluate(res["model"], a.task, L, 2, b, gen, cfg["device"])
        except torch.OutOfMemoryError:
            rows.append(("eval", L, float("nan")))
            break
        rows.append(("eval", L, acc))
        print(f"length {L}: accuracy {acc:.4f}")
    with open(os.path.join(a.out, name + ".json"), "w") as f:
        json.dump({"config": cfg, "curve": res["curve"], "eval": res["eval"], "rows": rows}, f)
    with open(os.path.join(a.out, name + ".md"), "w") as f:
        f.write(f"# {a.task}, {a.kind}\n\n{json.dumps(cfg)}\n\n| what | length | accuracy |\n"
                "| --- | --- | --- |\n")  # fmt: skip
        for what, L, acc in rows:
            f.write(f"| {what} | {L} | {acc:.4f} |\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s, loss, _ = zip(*res["curve"])
        plt.figure(figsize=(6, 3.5))
        plt.semilogy(s, loss)
        plt.xlabel("step")
        plt.ylabel("loss")
        plt.title(f"{a.task}, {a.kind}")
        plt.tight_layout()
        plt.savefig(os.path.join(a.out, name + ".png"), dpi=100)
    except ImportError:
        pass


# The CPU smoke configuration (CI): short sequences, a small model, seconds of training.
SMOKE = {
    "selective_copying": dict(seqlen=24, n_memorize=3, d_model=64, n_layers=2, d_state=16,
                              steps=400, batch=64, lr=3e-3, eval_every=100),
    "induction_heads": dict(seqlen=32, d_model=32, n_layers=2, d_state=8, steps=300, batch=32,
                            lr=3e-3, eval_every=100),
}  # fmt: skip

if __name__ == "__main__":
    main()
