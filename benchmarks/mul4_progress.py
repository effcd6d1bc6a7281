"""Where a multiplication training run stands, stage by stage (issue 8's runs span sessions).

    python benchmarks/mul4_progress.py RUN [RUN ...] [--tokens] [--reads] [--formats] [--lineage] [--unseen]
        [--aux] [--carries] [--eval-seed S] [--html PATH]

RUN is a run folder (unfinished: read from its checkpoint) or a model folder (finished: its training_log.jsonl),
e.g. `data/models/icot-mul4`. Each stage's row is its last evaluation: 500 held-out problems in the stage's own
format, teacher forcing ("exact": the whole remaining target, what greedy decoding writes; "answer": the 8 output
digits; "digits": their per-digit accuracy; "val": the validation exact match adaptive stages advance on).

`--tokens` (unfinished runs) also loads the checkpoint's model and prints, for the stage it is in, the accuracy of
every target token under teacher forcing on the same 500 problems ("P2[3]": digit 3 of P_2, "S2[0]", "c0", ...):
which part of its remaining chain of thought the model does not write.

`--reads` (unfinished runs) prints, for each answer digit c_k, the written chain-of-thought digits whose edit
changes its prediction most often (`mul4.cot_reliance`, 500 held-out problems): whether the answer is read off
the chain of thought or computed from the operands.

`--formats` (unfinished runs) evaluates the checkpoint's model in the formats with two tokens fewer to two tokens
more removed than its stage's. One token more or fewer shifts every later token by one position: a model that
reads its chain of thought by position rather than by content loses accuracy even where the extra tokens are
given (fewer removed) or trivial (a removed leading zero of P_j).

`--lineage` prints the chain of warm starts a run's weights come from (`mul4.run_lineage`: each run's steps used,
problems seen, seed, batch, training time) and their totals: the training time of a model taken up from other runs.

`--unseen` (finished runs and model folders) re-measures the held-out result (greedy, the card's seed and n_test)
and again on the held-out problems that no earlier run of the lineage drew (`mul4.held_out_unseen`): each run
excludes its own seed's held-out problems from training, not those of the seeds after it. The earlier runs' draws
are rebuilt by replaying their data generators (a minute or two for a long lineage).

`--aux` (runs and model folders trained with the auxiliary loss, e.g. `data/models/aux-mul4`) compares, per
output digit on 1,000 held-out problems under teacher forcing, what the auxiliary heads read off the last layer's
attention output (running-sum heads: the mean absolute error on ĉ_k, or on U_k for `aux_target=units`; all: the
share where the digit they imply is c_k) with what the model writes there (`mul4.aux_readout`): where the heads are
right and the model is not, c_k's information is present but not turned into the digit.

`--carries` (runs and model folders) prints, per output digit c_k, the share of 1,000 held-out problems on which
the model misses it under teacher forcing, grouped by the carry into column k (`mul4.errors_by_carry`): whether a
model's last errors are spread out or sit on the rare problems with large running sums.

`--eval-seed S` (repeatable; model folders, or runs in their last stage) scores the model greedily on another
seed's 1,000 held-out problems (`mul4.held_out(S, 1000)`): a second test set for a model that was picked among
several on its own seed's. A run excludes only its own seed's held-out problems from training, so about
(problems drawn) / 81M of these may have been in a training batch by chance (a fifth for a lineage of 17M).

`--html PATH` draws every run's evaluations against the training step (`plots.internalization_figure`); a run
warm-started from another run's checkpoint (`--set init_from=RUN`) is drawn from the step it continues.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from arithinterp import ArithInterpError, plots
from arithinterp.models import load_hf
from arithinterp.mul4 import (
    COT_LEN,
    aux_readout,
    checkpoint_model,
    cot_reliance,
    errors_by_carry,
    evaluate,
    format_model,
    greedy_eval,
    held_out,
    held_out_unseen,
    load_aux_heads,
    run_lineage,
    run_log,
    run_origin,
    stage_table,
    token_accuracy,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run or model folders")
    parser.add_argument("--tokens", action="store_true", help="per-token accuracy of a checkpoint's current stage")
    parser.add_argument("--reads", action="store_true", help="which written CoT digits each answer digit reads")
    parser.add_argument("--formats", action="store_true", help="accuracy in the neighbouring stages' formats")
    parser.add_argument("--lineage", action="store_true", help="the chain of warm starts and its total time")
    parser.add_argument("--unseen", action="store_true", help="held-out result on problems no earlier run drew")
    parser.add_argument("--aux", action="store_true", help="running-sum heads' readout against the model's digits")
    parser.add_argument("--carries", action="store_true", help="output-digit misses by the carry into each column")
    parser.add_argument(
        "--eval-seed",
        type=int,
        action="append",
        default=[],
        help="greedy exact match on held_out(SEED, 1000), another seed's problems (repeatable)",
    )
    parser.add_argument("--html", help="write a figure of the runs' evaluations against the training step here")
    args = parser.parse_args()
    logs = {}
    for run in args.runs:
        try:
            log = run_log(run)
        except ArithInterpError as err:
            print(f"{run}: {err}")
            continue
        logs[run] = log
        print(f"{run}: step {log[-1]['step'] if log else 0}, {log[-1]['time_s'] if log else 0:.0f} s of training")
        print(f"  {'stage':>5} {'removed':>7} {'steps':>13} {'exact':>6} {'answer':>6} {'digits':>6} {'val':>6}  ended")
        for r in stage_table(log):
            val = f"{r['val']:.3f}" if r.get("val") is not None else "-"
            scores = (f"{r['exact']:6.3f} {r['answer']:6.3f} {r['digits']:6.3f}" if "exact" in r
                      else f"{'-':>6} {'-':>6} {'-':>6}")  # fmt: skip
            ended = "on reaching advance_at" if r["advanced"] else ""
            steps = f"{r['first_step']:>6}-{r['last_step']:<6}"
            print(f"  {r['stage']:>5} {r['removed']:>7} {steps} {scores} {val:>6}  {ended}")
        if args.lineage:
            print_lineage(run)
        if args.unseen:
            print_unseen(run)
        if args.aux:
            print_aux(run)
        if args.carries or args.eval_seed:
            try:
                loaded = run_model(run)
            except ArithInterpError as err:
                print(f"  --carries/--eval-seed: {err}")
                continue
            if args.carries:
                print_carries(*loaded)
            if args.eval_seed:
                print_other_seeds(*loaded, args.eval_seed)
        if args.tokens or args.reads or args.formats:
            try:
                ckpt = checkpoint_model(run)
            except ArithInterpError as err:
                print(f"  --tokens/--reads/--formats: {err}")
                continue
            for flag, show in ((args.tokens, print_tokens), (args.reads, print_reads), (args.formats, print_formats)):
                if flag:
                    show(*ckpt)
    if args.html and logs:
        origins = {run: run_origin(run) for run in logs}
        fig = plots.internalization_figure(logs, origins=origins)
        print(f"wrote {plots.write_html(args.html, [fig], title='Stepwise internalization runs')}")


def print_lineage(run) -> None:
    links = run_lineage(run)
    print(f"  lineage ({len(links)} runs, oldest first; each run's steps up to the checkpoint the next one took):")
    for link in links:
        if link.get("missing"):
            print(f"    {link['run']}: not here (steps up to {link['steps']}); the totals below leave it out")
            continue
        lo, hi = link["removed"] or ("-", "-")
        print(f"    {link['run']}: {link['steps']} steps, removed {lo}..{hi}, seed {link['seed']}, batch "
              f"{link['batch_size']}, width {link['d_model']}, {link['problems'] / 1e6:.2f}M problems, "
              f"{link['time_s']:.0f} s")  # fmt: skip
    here = [link for link in links if not link.get("missing")]
    steps, problems, time_s = (sum(link[k] for link in here) for k in ("steps", "problems", "time_s"))
    print(f"    total: {steps} steps, {problems / 1e6:.2f}M problems, {time_s:.0f} s ({time_s / 3600:.1f} h)")


def print_unseen(run) -> None:
    try:
        r = held_out_unseen(run)
    except ArithInterpError as err:
        print(f"  --unseen: {err}")
        return
    clean = r["n"] - r["seen_by_sources"]
    for name, res, count in (("all", r["all"], r["n"]), ("never drawn before", r["unseen"], clean)):
        print(
            f"  held out, {name} ({count} problems): exact {res['exact_match']:.3f}, digits "
            f"{res['digit_accuracy']:.4f}, per digit {' '.join(f'{x:.3f}' for x in res['digit_accuracy_per_k'])}"
        )


def run_model(run) -> tuple[object, int, int]:
    """(model, seed, CoT tokens removed) of a run's checkpoint, in its stage's format, or of a model folder."""
    if (Path(run) / "checkpoint" / "checkpoint.pt").is_file():
        model, cfg, clock, state = checkpoint_model(run)
        removed = clock.sched.removals[clock.stage(state["step"])]
        return format_model(model, clock.sched, removed), cfg.seed, removed
    model, _, location = load_hf(run)
    return model, json.loads((Path(location) / "arithinterp.json").read_text())["train_config"]["seed"], COT_LEN


def print_carries(model, seed, removed) -> None:
    table = errors_by_carry(model, *held_out(seed, 1000), removed=removed)
    print(f"  share of c_k missed (teacher-forced), by the carry into column k (1,000 held-out problems, {removed} "
          "CoT tokens removed; problems in brackets):")  # fmt: skip
    for k, rows in enumerate(table):
        print(f"    c{k}: " + "  ".join(f"{r['carry']:>5} {r['miss']:.3f} ({r['n']})" for r in rows))


def print_other_seeds(model, _seed, removed, seeds) -> None:
    if removed != COT_LEN:
        print(f"  --eval-seed: the checkpoint is in a stage with {removed} CoT tokens removed; greedy no-cot "
              "evaluation needs a run in its last stage or a model folder.")  # fmt: skip
        return
    for seed in seeds:
        r = greedy_eval(model, seed, 1000)
        print(f"  held_out({seed}, 1000), greedy: exact {r['exact_match']:.3f}, digits {r['digit_accuracy']:.4f}, per "
              f"digit {' '.join(f'{x:.3f}' for x in r['digit_accuracy_per_k'])}")  # fmt: skip


def print_aux(run) -> None:
    try:
        aux = load_aux_heads(run)
    except ArithInterpError as err:
        print(f"  --aux: {err}")
        return
    model, seed, removed = run_model(run)
    r = aux_readout(model, aux, *held_out(seed, 1000), removed=removed)
    print(f"  {aux.target} heads vs the model's digits (1,000 held-out problems, {removed} CoT tokens removed):")
    print("    " + " " * 26 + "".join(f"{f'c{k}':>7}" for k in range(8)))
    value = "U_k" if aux.target == "units" else "ĉ_k"
    rows = (("mae", f"head |error| on {value}"), ("head_digit", "head's digit right"),
            ("model_digit", "model's digit right"))  # fmt: skip
    for key, name in rows:
        if key in r:
            print(f"    {name:<26}" + "".join(f"{x:7.3f}" for x in r[key]))


def print_tokens(model, cfg, clock, state) -> None:
    removed = clock.sched.removals[clock.stage(state["step"])]
    acc = token_accuracy(format_model(model, clock.sched, removed), cfg.seed, 500, removed)
    print(f"  per-token accuracy at step {state['step']} ({removed} CoT tokens removed, 500 held-out problems):")
    items = list(acc.items())
    for i in range(0, len(items), 8):
        print("   " + "".join(f" {name:>6} {value:5.3f}" for name, value in items[i : i + 8]))


def print_formats(model, cfg, clock, state) -> None:
    removed = clock.sched.removals[clock.stage(state["step"])]
    print(f"  the step-{state['step']} model (trained with {removed} removed) in other formats, 500 held-out problems:")
    for r in range(max(0, removed - 2), min(COT_LEN, removed + 2) + 1):
        e = evaluate(format_model(model, clock.sched, r), cfg.seed, 500, r)
        print(f"    {r:2} removed: whole exact {e['exact_match']:.3f}  answer exact {e['answer_exact_match']:.3f}  "
              f"digits {e['digit_accuracy']:.3f}")  # fmt: skip


def print_reads(model, cfg, clock, state) -> None:
    removed = clock.sched.removals[clock.stage(state["step"])]
    labels, sources, changed = cot_reliance(format_model(model, clock.sched, removed), *held_out(cfg.seed, 500),
                                            removed)  # fmt: skip
    print(f"  share of 500 problems whose c_k changes when one written CoT digit is edited (step {state['step']}, "
          f"{removed} removed); the three largest:")  # fmt: skip
    for k in range(8):
        row = changed[labels.index(f"c{k}")]
        top = row.nan_to_num(-1).topk(min(3, len(sources)))
        pairs = zip(top.values.tolist(), top.indices.tolist())
        print(f"    c{k}: " + ", ".join(f"{sources[j]} {v:.2f}" for v, j in pairs))


if __name__ == "__main__":
    main()
