"""The `arithinterp` command line: thin subcommands over the library.

Each subcommand parses its options, calls one library function and writes `<command>.json` and
`<command>.html` into `--out`. `main(argv)` runs in-process (tests call it directly) and returns the exit
status; user errors print one line `arithinterp: error: ...` and return 2.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import click

from arithinterp._errors import ArithInterpError
from arithinterp._io import atomic_write_json, prepare_out_dir
from arithinterp.metrics import METRICS
from arithinterp.models import DEFAULT_MODEL
from arithinterp.tasks import COUNTERFACTUALS, STYLES, TASKS


def _version() -> str:
    from arithinterp import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------------
# Shared options


def model_option(f):
    return click.option("--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
                        help="Built-in name (see `arithinterp models`), a local Hugging Face folder, or a hub name.")(f)  # fmt: skip


def task_options(f):
    """--task, --n, --seed, --style, --counterfactual, --digits, --range, --answer-token, --only-correct."""
    opts = [
        click.option("--task", default="add", show_default=True, type=click.Choice(TASKS), help="Arithmetic task."),
        click.option("--n", default=200, show_default=True, type=int, help="Number of examples."),
        click.option("--seed", default=0, show_default=True, type=int, help="Dataset seed."),
        click.option("--style", default=None, type=click.Choice(STYLES),
                     help="Prompt template; default: digits for built-in models, equation otherwise."),
        click.option("--counterfactual", default="operand", show_default=True, type=click.Choice(COUNTERFACTUALS)),
        click.option("--digits", default=3, show_default=True, type=int, help="Operand digits (digit style)."),
        click.option("--range", "operand_range", default=None, type=(int, int), help="Operand range LO HI (inclusive)."),
        click.option("--answer-token", default=0, show_default=True, type=int,
                     help="Which answer token is scored (0 = the first emitted)."),
        click.option("--only-correct/--all-examples", default=True, show_default=True,
                     help="Keep only prompts the model answers correctly."),
    ]  # fmt: skip
    for opt in reversed(opts):
        f = opt(f)
    return f


def out_options(command: str):
    def deco(f):
        f = click.option("--overwrite", is_flag=True, help="Allow writing into a non-empty --out folder.")(f)
        f = click.option("--out", default=None, type=click.Path(file_okay=False),
                         help=f"Output folder (default: runs/{command}-<model>-<task>-<time>).")(f)  # fmt: skip
        return f

    return deco


def default_out(command: str, model: str, task: str) -> Path:
    return Path("runs") / f"{command}-{Path(model).name}-{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_dataset(model, *, task, n, seed, style, counterfactual, digits, operand_range, answer_token, only_correct):
    """The task dataset for `model`'s tokenizer, optionally keeping only correctly answered prompts."""
    from arithinterp.tasks import TaskConfig, filter_correct, make_dataset

    config = TaskConfig(task=task, n=n, seed=seed, style=style, counterfactual=counterfactual, digits=digits,
                        operand_range=operand_range, answer_token=answer_token)  # fmt: skip
    dataset = make_dataset(model.tokenizer, config)
    if only_correct:
        dataset = filter_correct(model, dataset)
    return dataset


def result_header(*, model_spec: str, task: str, method: str, metric: str, dataset, seed: int) -> dict[str, Any]:
    """The fields every result JSON starts with, so a result can be reproduced."""
    return {
        "model": model_spec, "task": task, "method": method, "metric": metric, "n": len(dataset), "seed": seed,
        "style": dataset.style, "counterfactual": dataset.config.counterfactual,
        "answer_token": dataset.config.answer_token, "dataset_fingerprint": dataset.fingerprint(),
        "version": _version(),
    }  # fmt: skip


def user_errors(f):
    """Turn ArithInterpError into click's one-line usage error."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except ArithInterpError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


# ---------------------------------------------------------------------------------------------------------
# Commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="arithinterp")
def cli() -> None:
    """Find, explain and edit the circuits transformers use for arithmetic."""


@cli.command()
def models() -> None:
    """List the built-in models and where they live."""
    from arithinterp.models import list_builtins

    found = list_builtins()
    if not found:
        click.echo("no built-in models found under data/models/")
    for m in found:
        click.echo(f"{m.name:<12} {m.size_mb:>6.2f} MB  {m.path}  {m.description}")


@cli.command()
@model_option
@task_options
@click.option("--metric", default="logit_diff", show_default=True, type=click.Choice(METRICS))
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "fast", "transformer-lens"]))
@click.option("--top", default=10, show_default=True, type=int, help="How many ranked components to print.")
@out_options("patch")
@user_errors
def patch(model_spec, task, n, seed, style, counterfactual, digits, operand_range, answer_token, only_correct,
          metric, engine, top, out, overwrite) -> None:  # fmt: skip
    """Activation patching of every head output and MLP output at the final position."""
    from arithinterp.models import load
    from arithinterp.patching import patch_components
    from arithinterp.plots import patching_heatmap, write_html

    out_dir = prepare_out_dir(out or default_out("patch", model_spec, task), overwrite=overwrite)
    t0 = time.time()
    model = load(model_spec)
    dataset = build_dataset(model, task=task, n=n, seed=seed, style=style, counterfactual=counterfactual,
                            digits=digits, operand_range=operand_range, answer_token=answer_token,
                            only_correct=only_correct)  # fmt: skip
    result = patch_components(model, dataset, metric=metric, engine=engine)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    ranked = result.ranked()
    record = result_header(model_spec=model_spec, task=task, method="activation", metric=metric,
                           dataset=dataset, seed=seed)  # fmt: skip
    record.update({
        "granularity": "head_z+mlp_out", "position": "final", "direction": "denoising",
        "engine": result.info["engine"], "n_requested": n, "only_correct": only_correct,
        "baseline": {"clean": float(result.clean.mean()), "corrupted": float(result.corrupted.mean())},
        "components": ranked, "examples": dataset.records(), "wall_time_s": round(time.time() - t0, 2),
    })  # fmt: skip
    atomic_write_json(out_dir / "patch.json", record)
    title = f"Activation patching: {model_spec}, task {task} ({len(dataset)} examples, metric {metric})"
    fig = patching_heatmap(result, n_layers, n_heads, title=title)
    header = (f"<p>Denoising patching at the final position: score = (M_patched - M_corrupted) / "
              f"(M_clean - M_corrupted); 0 = corrupted, 1 = clean. Clean mean {record['baseline']['clean']:.3f}, "
              f"corrupted mean {record['baseline']['corrupted']:.3f}.</p>")  # fmt: skip
    write_html(out_dir / "patch.html", [fig], title=title, header=header)
    click.echo(f"{len(dataset)} examples; metric {metric}: clean {record['baseline']['clean']:.3f}, "
               f"corrupted {record['baseline']['corrupted']:.3f}")  # fmt: skip
    click.echo(f"{'rank':>4}  {'component':<9} {'score':>8}  95% CI")
    for i, r in enumerate(ranked[:top], 1):
        click.echo(f"{i:>4}  {r['name']:<9} {r['score']:>8.3f}  [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    click.echo(f"wrote {out_dir / 'patch.json'} and {out_dir / 'patch.html'}")


@cli.command()
@click.option("--task", default="add", show_default=True, help="Training task (see arithinterp.train.TRAIN_TASKS).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for the model.")
@click.option("--steps", default=None, type=int, help="Training steps (default: the task's).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Allow a non-empty --out (an unfinished run there resumes anyway).")
@user_errors
def train(task, out, steps, seed, overwrite) -> None:
    """Train a built-in model from scratch (resumes from the checkpoint in --out if there is one)."""
    from arithinterp.train import TrainConfig, default_config, train as run_train

    cfg = default_config(task)
    overrides = {"seed": seed} | ({"steps": steps} if steps is not None else {})
    cfg = TrainConfig(**{**cfg.__dict__, **overrides})
    summary = run_train(cfg, out, overwrite=overwrite)
    click.echo(f"held-out: {summary['held_out']}; train time {summary['train_time_s']} s; wrote {out}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit status (2 for user errors, with a one-line message)."""
    try:
        cli.main(args=argv, prog_name="arithinterp", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("arithinterp: aborted", err=True)
        return 1
    except click.ClickException as exc:
        message = exc.format_message().splitlines()[0] if exc.format_message() else str(exc)
        click.echo(f"arithinterp: error: {message}", err=True)
        return 2
    except ArithInterpError as exc:
        click.echo(f"arithinterp: error: {exc}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
