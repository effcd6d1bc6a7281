"""Where a multiplication training run stands, stage by stage (issue 8's runs span sessions).

    python benchmarks/mul4_progress.py RUN [RUN ...]

RUN is a run folder (unfinished: read from its checkpoint) or a model folder (finished: its training_log.jsonl),
e.g. `data/models/icot-mul4`. Each stage's row is its last evaluation: 500 held-out problems in the stage's own
format, teacher forcing ("exact": the whole remaining target, what greedy decoding writes; "answer": the 8 output
digits; "digits": their per-digit accuracy; "val": the validation exact match adaptive stages advance on).
"""

from __future__ import annotations

import argparse

from arithinterp import ArithInterpError
from arithinterp.mul4 import run_log, stage_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run or model folders")
    args = parser.parse_args()
    for run in args.runs:
        try:
            log = run_log(run)
        except ArithInterpError as err:
            print(f"{run}: {err}")
            continue
        print(f"{run}: step {log[-1]['step'] if log else 0}, {log[-1]['time_s'] if log else 0:.0f} s of training")
        print(f"  {'stage':>5} {'removed':>7} {'steps':>13} {'exact':>6} {'answer':>6} {'digits':>6} {'val':>6}  ended")
        for r in stage_table(log):
            val = f"{r['val']:.3f}" if r.get("val") is not None else "-"
            scores = (f"{r['exact']:6.3f} {r['answer']:6.3f} {r['digits']:6.3f}" if "exact" in r
                      else f"{'-':>6} {'-':>6} {'-':>6}")  # fmt: skip
            ended = "on reaching advance_at" if r["advanced"] else ""
            steps = f"{r['first_step']:>6}-{r['last_step']:<6}"
            print(f"  {r['stage']:>5} {r['removed']:>7} {steps} {scores} {val:>6}  {ended}")


if __name__ == "__main__":
    main()
