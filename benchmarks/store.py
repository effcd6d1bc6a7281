"""Benchmark of the activation store: overhead over a bare forward pass, and memory that does not grow with n.

    python benchmarks/store.py                      # tiny-add, 100,000 examples (several minutes)
    python benchmarks/store.py --n 20000 --small 2000  # a quicker look

Throughput: the residual stream of every layer (`blocks.0.hook_resid_pre` and every `hook_resid_post`, all
positions, float32) is stored to disk for `--n` examples, and the same prompts are run through the model with
no hooks at all, in the same process, alternating (bare, store, bare, store, bare): the medians are compared,
in wall time and in CPU time (all threads, so the writer thread's work counts even where it overlaps). Target:
store time <= 1.25 x bare time. Prompt generation is not timed: the dataset is built first.

Memory: a fresh child process per size writes the same store for `--small` and `--n` examples from a
`TaskStream` (prompts generated lazily, chunk by chunk) and reports its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`). Target: the two within 20% of each other.

Results are printed and written as JSON (`--json`, default benchmarks/results/store.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def child_rss(args) -> None:
    """Write a store of `args.child_n` examples from a TaskStream; print the peak RSS as JSON."""
    _setup(args.threads)
    from arithinterp.models import load
    from arithinterp.store import StoreConfig, TaskStream, write_store
    from arithinterp.tasks import TaskConfig

    model = load(args.model)
    source = TaskStream(model.tokenizer, TaskConfig(n=args.child_n, seed=1), chunk_size=args.shard_size)
    out = Path(tempfile.mkdtemp(prefix="store-bench-"))
    try:
        t0 = time.perf_counter()
        write_store(model, source, out / "s", StoreConfig(batch_size=args.batch_size, shard_size=args.shard_size),
                    progress=False)  # fmt: skip
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in (out / "s").iterdir())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"n": args.child_n, "peak_rss_mb": round(peak, 1), "wall_s": round(wall, 1),
                      "store_mb": round(size / 1e6, 1)}))  # fmt: skip


def throughput(args) -> dict:
    torch = _setup(args.threads)
    from arithinterp.models import load
    from arithinterp.store import StoreConfig, write_store
    from arithinterp.tasks import TaskConfig, make_dataset

    model = load(args.model)
    t0 = time.perf_counter()
    dataset = make_dataset(model.tokenizer, TaskConfig(n=args.n, seed=1))
    gen_s = time.perf_counter() - t0
    tokens = dataset.clean_tokens

    def cpu() -> float:  # user + system time of every thread of this process (the writer thread included)
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    @torch.no_grad()
    def bare() -> tuple[float, float]:
        t, c = time.perf_counter(), cpu()
        for b in range(0, len(tokens), args.batch_size):
            model(tokens[b : b + args.batch_size])
        return time.perf_counter() - t, cpu() - c

    def store() -> tuple[float, float, int, int]:
        out = Path(tempfile.mkdtemp(prefix="store-bench-"))
        try:
            t, c = time.perf_counter(), cpu()
            config = StoreConfig(batch_size=args.batch_size, shard_size=args.shard_size)
            s = write_store(model, dataset, out / "s", config, progress=False)
            wall, used = time.perf_counter() - t, cpu() - c
            return wall, used, sum(p.stat().st_size for p in (out / "s").iterdir()), len(s.hooks)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    model(tokens[:8])  # warm up
    bares, stores = [bare()], []
    for _ in range(args.repeats):  # bare, store, bare, store, ..., bare: drifts in machine load hit both alike
        *timing, size, n_hooks = store()
        stores.append(timing)
        bares.append(bare())
    b_wall, b_cpu = (float(np.median([x[i] for x in bares])) for i in (0, 1))
    s_wall, s_cpu = (float(np.median([x[i] for x in stores])) for i in (0, 1))
    return {"n": args.n, "hooks": n_hooks, "positions": int(tokens.shape[1]), "dataset_generation_s": round(gen_s, 1),
            "bare_wall_s": [round(x[0], 2) for x in bares], "store_wall_s": [round(x[0], 2) for x in stores],
            "bare_cpu_s": [round(x[1], 2) for x in bares], "store_cpu_s": [round(x[1], 2) for x in stores],
            "bare_examples_per_s": round(args.n / b_wall, 1), "store_examples_per_s": round(args.n / s_wall, 1),
            "overhead": round(s_wall / b_wall - 1, 4), "overhead_cpu": round(s_cpu / b_cpu - 1, 4),
            "store_mb": round(size / 1e6, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-add")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2, help="store runs, each followed by a bare run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable numbers on a shared machine)")
    p.add_argument("--json", default=str(HERE / "results" / "store.json"))
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--child-n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_n is not None:
        return child_rss(args)
    result = {"model": args.model, "batch_size": args.batch_size, "shard_size": args.shard_size,
              "threads": args.threads, "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "load_average_start": os.getloadavg()}  # fmt: skip
    if not args.skip_throughput:
        result["throughput"] = t = throughput(args)
        print(f"throughput ({t['n']} examples, {t['hooks']} hooks x {t['positions']} positions, {t['store_mb']} MB): "
              f"bare {t['bare_examples_per_s']} ex/s, store {t['store_examples_per_s']} ex/s, "
              f"overhead {100 * t['overhead']:.1f}% wall (target <= 25%), {100 * t['overhead_cpu']:.1f}% CPU time "
              "(medians)")  # fmt: skip
    if not args.skip_memory:
        rss = []
        for n in (args.small, args.n):
            cmd = [sys.executable, __file__, "--child-n", str(n), "--model", args.model, "--threads", str(args.threads),
                   "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]  # fmt: skip
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rss.append(json.loads(done.stdout.strip().splitlines()[-1]))
        ratio = rss[1]["peak_rss_mb"] / rss[0]["peak_rss_mb"]
        result["memory"] = {"runs": rss, "ratio": round(ratio, 4)}
        print(f"peak RSS: {rss[0]['peak_rss_mb']} MB for {rss[0]['n']} examples, {rss[1]['peak_rss_mb']} MB for "
              f"{rss[1]['n']} examples: ratio {ratio:.3f} (target within 20%)")  # fmt: skip
    result["load_average_end"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
