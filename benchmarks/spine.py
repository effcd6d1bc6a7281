"""Issue-2 figures: `arithinterp patch --task add` wall time, and fast engine vs transformer-lens on tiny-add.

    python benchmarks/spine.py [--model tiny-add] [--n 200] [--json out.json]

Runs the CLI command exactly as a user would (a fresh process, model loading included) and times it; then runs
final-position head/MLP patching with both engines on the same model and inputs and reports the largest
absolute differences of the per-example metric and of the normalised scores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-add")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "arithinterp.cli", "patch", "--model", args.model, "--task", "add",
                        "--n", str(args.n), "--out", f"{tmp}/run"], check=True, capture_output=True)  # fmt: skip
        cli_wall = time.perf_counter() - t0

    import arithinterp as ai

    model = ai.load(args.model)
    data = ai.make_dataset(model.tokenizer, task="add", n=args.n)
    t0 = time.perf_counter()
    fast = ai.patch_components(model, data, engine="fast", progress=False)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = ai.patch_components(model, data, engine="transformer-lens", progress=False)
    t_tl = time.perf_counter() - t0
    out = {
        "model": args.model, "n": len(data),
        "cli_patch_wall_s": round(cli_wall, 2),
        "engine_fast_s": round(t_fast, 3), "engine_transformer_lens_s": round(t_tl, 3),
        "max_abs_diff_per_example_metric": float((fast.patched - ref.patched).abs().max()),
        "max_abs_diff_normalised_score": float((fast.scores - ref.scores).abs().max()),
        "top5_fast": [r["name"] for r in fast.ranked()[:5]], "top5_tl": [r["name"] for r in ref.ranked()[:5]],
    }  # fmt: skip
    for k, v in out.items():
        print(f"{k:<34} {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
