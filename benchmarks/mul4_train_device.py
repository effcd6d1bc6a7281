"""Train the three multiplication built-ins side by side on one accelerator (how the shipped ones were made).

Each task runs in its own process with the built-in settings (`arithinterp.train.default_config`), in chunks of
`--chunk` steps; after each chunk the checkpoint is on disk and one status line is printed, so the run can be
stopped anywhere and resumed with the same command (the same --out):

    python benchmarks/mul4_train_device.py --device cuda --out runs/             # all three
    python benchmarks/mul4_train_device.py --device cuda --out runs/ --tasks mul4-icot --max-seconds 500

`--steps` overrides the total steps (for timing runs only: a run with other steps is another run). The finished
models are ordinary model folders `runs/icot-mul4`, `runs/sft-mul4`, `runs/aux-mul4` (copy them to data/models/).
The same training, one task at a time, is `arithinterp train --task mul4-icot --device cuda --out DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

NAMES = {"mul4-icot": "icot-mul4", "mul4-sft": "sft-mul4", "mul4-aux": "aux-mul4"}


def run_one(task: str, out: Path, device: str, chunk: int, max_seconds: float | None, steps: int | None,
            stage_steps: int | None) -> None:  # fmt: skip
    import torch

    from arithinterp import mul4
    from arithinterp.mul4 import train_mul4
    from arithinterp.train import default_config

    torch.set_num_threads(1)
    cfg = default_config(task)
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    if stage_steps is not None:
        mul4.SCHEDULES[task] = dataclasses.replace(mul4.SCHEDULES[task], steps_per_stage=stage_steps)
    ckpt = out / "checkpoint" / "checkpoint.pt"
    # steps/s comes from the change in step: a chunk cut short by --max-seconds runs fewer than `chunk` steps
    done = torch.load(ckpt, weights_only=True, map_location="cpu")["step"] if ckpt.is_file() else 0
    t0 = time.time()
    while True:
        left = None if max_seconds is None else max_seconds - (time.time() - t0)
        if left is not None and left <= 0:
            print(f"[{task}] time budget spent; resume with the same command", flush=True)
            return
        t_chunk = time.time()
        result = train_mul4(cfg, out, progress=False, max_steps_this_run=chunk, max_seconds=left, device=device)
        if result.get("finished") is False:
            state = torch.load(ckpt, weights_only=True, map_location="cpu")
            last = next((e for e in reversed(state["log"]) if "eval_exact_match" in e), (state["log"] or [{}])[-1])
            shown = {k: v for k, v in last.items() if k not in ("lr", "time_s")}
            print(
                f"[{task}] step {result['step']}/{cfg.steps} stage {result['stage']}  "
                f"{(result['step'] - done) / (time.time() - t_chunk):.1f} steps/s  last eval: {json.dumps(shown)}",
                flush=True,
            )
            done = result["step"]
            continue
        print(f"[{task}] finished: held-out {json.dumps(result['held_out'])}; {result['train_time_s']} s", flush=True)
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder of the runs (one sub-folder per model)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tasks", nargs="+", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--chunk", type=int, default=1000, help="steps between status lines (and checkpoints)")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop (checkpoint kept) after this long")
    parser.add_argument("--steps", type=int, default=None, help="override the total steps (timing runs only)")
    parser.add_argument("--stage-steps", type=int, default=None, help="override icot's steps per stage (likewise)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: train this task
    args = parser.parse_args()
    if args.one:
        run_one(
            args.one,
            args.out / NAMES[args.one],
            args.device,
            args.chunk,
            args.max_seconds,
            args.steps,
            args.stage_steps,
        )
        return
    args.out.mkdir(parents=True, exist_ok=True)
    extra = ["--chunk", str(args.chunk), "--device", args.device]
    extra += ["--max-seconds", str(args.max_seconds)] if args.max_seconds is not None else []
    extra += ["--steps", str(args.steps)] if args.steps is not None else []
    extra += ["--stage-steps", str(args.stage_steps)] if args.stage_steps is not None else []
    procs = [subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--one", t, *extra])
             for t in args.tasks]  # fmt: skip
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"a training process failed: exit codes {dict(zip(args.tasks, codes))}")


if __name__ == "__main__":
    main()
