"""Experiment for issue 8: does an ICoT stage recover if it is given more steps?

Run on the first, CPU-sized `icot-mul4` (width 128, batch 64, 3,000 steps a stage; every stage ended less accurate
than the one before). This trains stage 0 (the full chain of thought) for `--stage0` steps and then stage 1 (8 CoT
tokens removed) for `--stage1` steps with those settings (`CPU_SIZE`, not today's GPU-sized defaults), and prints
stage 1's held-out evaluation every 500 steps (500 problems, its own format, teacher forcing):

    OMP_NUM_THREADS=1 python benchmarks/mul4_stage_length.py --out /tmp/stage-length   # ~35 min on one core

Compare with stage 1 of that run (`data/models/icot-mul4/training_log.jsonl` as of commit 96257f7, steps
3,000-6,000). The run is resumable (same --out); `--max-seconds` stops it early with the checkpoint kept.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from arithinterp import mul4
from arithinterp.train import default_config

#: the settings of the CPU-trained icot-mul4 this experiment was made for (the built-ins are now GPU-sized)
CPU_SIZE = dict(d_model=128, d_mlp=512, batch_size=64, checkpoint_every=200)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TwoStages(mul4.Mul4Schedule):
    """Stage 0 for `stage0_steps`, then stage 1 to the end (the other stages never start)."""

    stage0_steps: int = 2500

    def stage_at(self, step: int) -> int:
        return 0 if step < self.stage0_steps else 1

    def stage_start(self, stage: int) -> int:
        return 0 if stage == 0 else self.stage0_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage0", type=int, default=2500, help="steps with the full chain of thought")
    parser.add_argument("--stage1", type=int, default=10_000, help="steps with 8 CoT tokens removed")
    parser.add_argument("--out", required=True, help="run folder (a checkpoint there resumes)")
    parser.add_argument("--max-seconds", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    schedule = TwoStages(remove_per_stage=8, stage0_steps=args.stage0)
    cfg = dataclasses.replace(default_config("mul4-icot"), steps=args.stage0 + args.stage1, **CPU_SIZE)
    mul4.train_mul4(cfg, args.out, progress=True, max_seconds=args.max_seconds, schedule=schedule)
    for e in mul4.run_log(args.out):
        if "eval_exact_match" in e and e["stage"] == 1:
            print(f"step {e['step']:6} ({e['step'] - args.stage0:5} into stage 1)  whole target exact "
                  f"{e['eval_exact_match']:.3f}  answer exact {e['eval_answer_exact_match']:.3f}  "
                  f"digits {e['eval_digit_accuracy']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
