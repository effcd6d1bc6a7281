"""Issue-7 table: selective vs full vs random-heads vs LoRA fine-tuning of tiny-mixed, averaged over seeds.

    python benchmarks/finetune.py [--model tiny-mixed] [--circuit circuit.json] [--k 4] [--seeds 0 1 2]
        [--out DIR] [--digits 2] [--epochs 4] [--lr 3e-4] [--arm-lr full=1e-4 ...] [--n-train 4000]
        [--n-eval 300] [--baselines full,random,lora] [--heads-only]

Target: 2-digit addition in the built-in digit format ("12+34=" -> "640"), which tiny-mixed (trained on 3-digit
operands) gets 0% right; transfer: 1- and 3-digit addition; retention: letter reversal. Without --circuit, the
circuit is the top-k heads by activation patching, each head scored by its largest |score| over the four answer
digits of 3-digit addition (`locate_heads`, as in notebooks/05_finetune.ipynb), saved to DIR/circuit.json.
`arithinterp.finetune.finetune` then runs every arm once per seed (DIR/seed<k>/), and the script writes
DIR/summary.json, DIR/summary.md (mean ± standard deviation over seeds of target and transfer accuracy,
retention, trainable parameters, training time, per arm) and DIR/summary.html.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every measure, per arm (and of the input model)."""
    first = records[0]
    measures = ["target"] + [f"transfer: {k}" for k in first["before"]["transfer"]]
    measures += ["retention"] if first["before"]["retention"] is not None else []

    def get(m: dict, name: str) -> float:
        return m["target"] if name == "target" else m["retention"] if name == "retention" else m["transfer"][name[10:]]

    rows = {"before": {name: _mean_sd([get(r["before"], name) for r in records]) for name in measures}}
    for arm in first["arms"]:
        rows[arm] = {name: _mean_sd([get(r["arms"][arm]["after"], name) for r in records]) for name in measures}
        rows[arm]["trainable_parameters"] = _mean_sd([r["arms"][arm]["trainable_parameters"] for r in records])
        rows[arm]["train_time_s"] = _mean_sd([r["arms"][arm]["train_time_s"] for r in records])
        rows[arm]["lr"] = first["arms"][arm]["lr"]
    keep = ("model", "components", "settings", "n_parameters", "retention")
    return {"measures": measures, "rows": rows, "seeds": [r["seed"] for r in records],
            "target": first["data"]["target"]} | {k: first[k] for k in keep}  # fmt: skip


def markdown(summary: dict) -> str:
    """The table, mean ± sd over seeds."""
    cols = summary["measures"] + ["trainable params", "train time (s)", "lr"]
    lines = ["| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for arm, row in summary["rows"].items():
        cells = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" for m in summary["measures"]]
        if arm == "before":
            cells += ["-", "-", "-"]
        else:
            cells += [
                f"{row['trainable_parameters'][0]:,.0f}",
                f"{row['train_time_s'][0]:.1f} ± {row['train_time_s'][1]:.1f}",
                f"{row['lr']:g}",
            ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def locate_heads(model_spec: str, k: int, n: int = 100):
    """The top-k heads by activation patching, each scored by its largest |score| over the answer digits of
    3-digit addition (`answer_token` 0..3) - the same procedure as notebooks/05_finetune.ipynb."""
    import arithinterp as ai
    from arithinterp.localize import Selection, localize

    model = ai.load(model_spec)
    best: dict = {}
    for token in range(4):
        data = ai.filter_correct(model, ai.make_dataset(model.tokenizer, task="add", n=n, seed=0, answer_token=token))
        result = ai.patch_components(model, data, progress=False)
        for c, s in zip(result.components, result.scores.tolist()):
            if c.kind == "head":
                best[c] = max(best.get(c, 0.0), abs(s))
    return localize(best, select=Selection.top_k(k), method="activation patching, max |score| over answer digits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-mixed")
    ap.add_argument("--circuit", type=Path, default=None)
    ap.add_argument("--k", type=int, default=4, help="circuit size (heads) when locating it here")
    ap.add_argument("--baselines", default="full,random,lora")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-finetune"))
    ap.add_argument("--digits", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--arm-lr", nargs="*", default=[], help="per-arm learning rates, e.g. full=3e-4 lora=3e-3")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--heads-only", action="store_true")
    args = ap.parse_args()

    from arithinterp.finetune import FinetuneConfig, finetune, read_circuit
    from arithinterp.plots import finetune_summary, write_html
    from arithinterp.tasks import TaskConfig

    args.out.mkdir(parents=True, exist_ok=True)
    circuit = args.circuit
    if circuit is None:
        circuit = args.out / "circuit.json"
        if not circuit.is_file():
            locate_heads(args.model, args.k).save(circuit)
    components, info = read_circuit(circuit)
    arm_lr = tuple((a.split("=")[0], float(a.split("=")[1])) for a in args.arm_lr)
    records = []
    for seed in args.seeds:
        cfg = FinetuneConfig(target=TaskConfig(task="add", digits=args.digits), n_train=args.n_train,
                             n_eval=args.n_eval, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             lr_by_arm=arm_lr, baselines=tuple(args.baselines.split(",")),
                             include_mlps=not args.heads_only, seed=seed)  # fmt: skip
        folder = args.out / f"seed{seed}"
        done = folder / "finetune.json"
        if done.is_file() and json.loads(done.read_text())["settings"] == json.loads(json.dumps(asdict(cfg))):
            records.append(json.loads(done.read_text()))  # finished earlier with these settings: reuse
            continue
        t0 = time.time()
        records.append(finetune(args.model, components, folder, config=cfg, overwrite=done.is_file(),
                                circuit_info=info | {"path": str(circuit)}))  # fmt: skip
        print(f"seed {seed}: {time.time() - t0:.0f} s")
    summary = summarise(records)
    table = markdown(summary)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(table)
    title = f"Selective fine-tuning of {args.model} on {summary['target']}: {len(records)} seeds"
    write_html(args.out / "summary.html", [finetune_summary(summary)], title=title,
               header=f"<p>Circuit: {', '.join(summary['components'])}.</p>")  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
