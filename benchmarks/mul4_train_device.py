"""Train the three multiplication built-ins side by side on one accelerator (how the shipped ones were made).

Each task runs in its own process with the built-in settings (`arithinterp.train.default_config`), in chunks of
`--chunk` steps; after each chunk the checkpoint is on disk and one status line is printed, so the run can be
stopped anywhere and resumed with the same command (the same --out):

    python benchmarks/mul4_train_device.py --device cuda --out runs/             # all three
    python benchmarks/mul4_train_device.py --device cuda --out runs/ --tasks mul4-icot --max-seconds 500

`--set NAME=VALUE` (repeatable) changes a setting of every task run, as `arithinterp train --set` does: a field
of TrainConfig (`lr=3e-4`, `batch_size=64`, `d_model=768`) or of Mul4Schedule (`steps_per_stage=6000`,
`advance_at=0.95`; a schedule field a task does not have is an error, so run icot-only settings with
`--tasks mul4-icot`). `--steps N` and `--stage-steps S` are short for `--set steps=N` and
`--set steps_per_stage=S`. A run with other settings is another run: give it another --out. The finished
models are ordinary model folders `runs/icot-mul4`, `runs/sft-mul4`, `runs/aux-mul4` (copy them to data/models/).
The same training, one task at a time, is `arithinterp train --task mul4-icot --device cuda --out DIR`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

NAMES = {"mul4-icot": "icot-mul4", "mul4-sft": "sft-mul4", "mul4-aux": "aux-mul4"}


def run_one(task: str, out: Path, device: str, chunk: int, max_seconds: float | None, settings: list[str]) -> None:
    import torch

    from arithinterp.mul4 import run_log, train_mul4
    from arithinterp.train import configure

    torch.set_num_threads(1)
    cfg, schedule = configure(task, settings)
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
        result = train_mul4(cfg, out, progress=False, max_steps_this_run=chunk, max_seconds=left, device=device,
                            schedule=schedule)  # fmt: skip
        if result.get("finished") is False:
            log = run_log(out)
            last = next((e for e in reversed(log) if "eval_exact_match" in e), (log or [{}])[-1])
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
    parser.add_argument("--steps", type=int, default=None, help="short for --set steps=N")
    parser.add_argument("--stage-steps", type=int, default=None, help="short for --set steps_per_stage=S")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                        help="override a TrainConfig or Mul4Schedule setting (repeatable)")  # fmt: skip
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: train this task
    args = parser.parse_args()
    settings = [f"steps={args.steps}"] if args.steps is not None else []
    settings += [f"steps_per_stage={args.stage_steps}"] if args.stage_steps is not None else []
    settings += args.settings
    if args.one:
        run_one(
            args.one,
            args.out / NAMES[args.one],
            args.device,
            args.chunk,
            args.max_seconds,
            settings,
        )
        return
    args.out.mkdir(parents=True, exist_ok=True)
    extra = ["--chunk", str(args.chunk), "--device", args.device]
    extra += ["--max-seconds", str(args.max_seconds)] if args.max_seconds is not None else []
    extra += [arg for item in settings for arg in ("--set", item)]
    procs = [subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--one", t, *extra])
             for t in args.tasks]  # fmt: skip
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"a training process failed: exit codes {dict(zip(args.tasks, codes))}")


if __name__ == "__main__":
    main()
