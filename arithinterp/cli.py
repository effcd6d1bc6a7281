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
from typing import Any, Sequence, get_args

import click

from arithinterp._errors import ArithInterpError
from arithinterp._io import atomic_write_json, check_out_dir, prepare_out_dir
from arithinterp.circuit import DIRECTIONS, SELECT_HOW
from arithinterp.finetune import GradScale, Optimizer
from arithinterp.localize import ABLATIONS, BASELINES, POSITIONS, SCORE_METHODS
from arithinterp.metrics import METRICS
from arithinterp.models import DEFAULT_MODEL
from arithinterp.patching import CLI_GRANULARITIES as PATCH_GRANULARITIES
from arithinterp.patching import DIRECTIONS as PATCH_DIRECTIONS
from arithinterp.patching import PATCH_METHODS, Engine, model_dims
from arithinterp.probes import Control, Estimator, ProbeKind
from arithinterp.store import DTYPES
from arithinterp.tasks import COUNTERFACTUALS, OPS, STYLES, TASKS


def _version() -> str:
    from arithinterp import __version__

    return __version__


# ---------------------------------------------------------------------------------------------------------
# Shared options


def model_option(f):
    return click.option(
        "--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
        help="Built-in name (see `arithinterp models`), a local Hugging Face folder, or a hub name.",
    )(f)  # fmt: skip


def choice(*decls: str, choices: Sequence[str], default: str | None, help: str | None = None):
    """An option whose values come from a library registry or Literal type, never from a list typed here."""
    return click.option(*decls, default=default, show_default=default is not None, type=click.Choice(list(choices)),
                        help=help)  # fmt: skip


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
        click.option("--range", "operand_range", default=None, type=(int, int),
                     help="Operand range LO HI (inclusive)."),
        click.option("--answer-token", default=0, show_default=True, type=int,
                     help="Which answer token is scored (0 = the first emitted)."),
        click.option("--only-correct/--all-examples", default=False, show_default=True,
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


def task_config(*, task, n, seed, style, counterfactual, digits, operand_range, answer_token, **_ignored):
    """Validate the task options before anything slow happens (model loading)."""
    from arithinterp.tasks import TaskConfig

    return TaskConfig(task=task, n=n, seed=seed, style=style, counterfactual=counterfactual, digits=digits,
                      operand_range=operand_range, answer_token=answer_token)  # fmt: skip


def build_dataset(model, *, only_correct: bool, **task_options):
    """The task dataset for `model`'s tokenizer, optionally keeping only correctly answered prompts."""
    from arithinterp.tasks import filter_correct, make_dataset

    dataset = make_dataset(model.tokenizer, task_config(**task_options))
    if only_correct:
        dataset = filter_correct(model, dataset)
    return dataset


def model_and_dataset(model_spec: str, *, only_correct: bool, **task_options):
    """Check the task options (before the slow model load), then load the model and build its dataset."""
    from arithinterp.models import load

    task_config(**task_options)
    model = load(model_spec)
    return model, build_dataset(model, only_correct=only_correct, **task_options)


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
@choice("--metric", choices=METRICS, default="logit_diff")
@choice("--engine", choices=get_args(Engine), default="auto")
@choice(
    "--method",
    choices=PATCH_METHODS,
    default="activation",
    help="Exact activation patching, path patching, or attribution patching (AtP; EAP-IG).",
)
@choice("--granularity", choices=PATCH_GRANULARITIES, default=None,
        help="What is patched. activation: components (heads' z and MLP outputs; default), heads, head_q, "
             "head_k, head_v, head_pattern, attn_out, mlp_out, resid_pre, resid_mid, resid_post. "
             "attribution/eap-ig: components (nodes) or edge (default for eap-ig).")  # fmt: skip
@click.option(
    "--position",
    default="final",
    show_default=True,
    help="Where to patch: final, each (a sweep over positions), all (all at once) or a token index. "
    "Path patching always patches a sender's write at every position.",
)
@choice(
    "--direction",
    choices=PATCH_DIRECTIONS,
    default="denoising",
    help="denoising: clean activations into the corrupted run; noising: the reverse.",
)
@click.option("--senders", default=None, help="Path patching: comma-separated senders (default: every head and MLP).")
@click.option(
    "--receivers",
    default="logits",
    show_default=True,
    help="Path patching: comma-separated receivers: logits, MLP<l>, L<l>H<h> (q, k and v), L<l>H<h>.q|k|v.",
)
@click.option("--iterative", is_flag=True, help="Path patching: map the circuit backwards from the logits.")
@click.option(
    "--threshold",
    default=0.1,
    show_default=True,
    type=float,
    help="Iterative path patching (and edges drawn): keep paths with |effect| at least this.",
)
@click.option("--ig-steps", default=5, show_default=True, type=int, help="eap-ig: integrated-gradient steps.")
@click.option("--compare-exact", is_flag=True, help="attribution/eap-ig: also run exact patching and report the "
              "Spearman rank correlation with it.")  # fmt: skip
@click.option("--top", default=10, show_default=True, type=int, help="How many ranked components to print.")
@out_options("patch")
@user_errors
def patch(model_spec, task, n, seed, style, counterfactual, digits, operand_range, answer_token, only_correct,
          metric, engine, method, granularity, position, direction, senders, receivers, iterative, threshold,
          ig_steps, compare_exact, top, out, overwrite) -> None:  # fmt: skip
    """Activation, path or attribution patching; by default every head output and MLP output at the final position."""
    from arithinterp.patching import patch_components
    from arithinterp.plots import patching_heatmap

    default = (method == "activation" and granularity in (None, "components") and position == "final"
               and direction == "denoising")  # fmt: skip
    out_dir = check_out_dir(out or default_out("patch", model_spec, task), overwrite=overwrite)
    t0 = time.time()
    model, dataset = model_and_dataset(model_spec, only_correct=only_correct, task=task, n=n, seed=seed, style=style,
                                       counterfactual=counterfactual, digits=digits, operand_range=operand_range,
                                       answer_token=answer_token)  # fmt: skip
    if not default:
        report = _patch_report(model, dataset, method=method, granularity=granularity, position=position,
                               direction=direction, senders=senders, receivers=receivers, iterative=iterative,
                               threshold=threshold, ig_steps=ig_steps, compare_exact=compare_exact, metric=metric,
                               engine=engine, what=f"{model_spec}, task {task} ({len(dataset)} examples)")  # fmt: skip
        record = result_header(model_spec=model_spec, task=task, method=method, metric=metric, dataset=dataset,
                               seed=seed)  # fmt: skip
        record.update({**report["record"], "n_requested": n, "only_correct": only_correct,
                       "examples": dataset.records(), "wall_time_s": round(time.time() - t0, 2)})  # fmt: skip
        _write_patch(out_dir, record, report, overwrite=overwrite, top=top)
        return
    result = patch_components(model, dataset, metric=metric, engine=engine)
    n_layers, n_heads = model_dims(model)
    ranked = result.ranked()
    record = result_header(model_spec=model_spec, task=task, method="activation", metric=metric,
                           dataset=dataset, seed=seed)  # fmt: skip
    record.update({
        "granularity": "head_z+mlp_out", "position": "final", "direction": "denoising",
        "engine": result.info["engine"], "n_requested": n, "only_correct": only_correct,
        "baseline": {"clean": float(result.clean.mean()), "corrupted": float(result.corrupted.mean())},
        "components": ranked, "examples": dataset.records(), "wall_time_s": round(time.time() - t0, 2),
    })  # fmt: skip
    title = f"Activation patching: {model_spec}, task {task} ({len(dataset)} examples, metric {metric})"
    header = (f"<p>Denoising patching at the final position: score = (M_patched - M_corrupted) / "
              f"(M_clean - M_corrupted); 0 = corrupted, 1 = clean. Clean mean {record['baseline']['clean']:.3f}, "
              f"corrupted mean {record['baseline']['corrupted']:.3f}.</p>")  # fmt: skip
    report = {"figures": [patching_heatmap(result, n_layers, n_heads, title=title)], "title": title, "header": header}
    _write_patch(out_dir, record, report, overwrite=overwrite, top=top)


def _write_patch(out_dir: Path, record: dict[str, Any], report: dict[str, Any], *, overwrite: bool, top: int) -> None:
    """Write `record` to patch.json and `report`'s figures to patch.html, then print the ranking (every method)."""
    from arithinterp.plots import write_html

    prepare_out_dir(out_dir, overwrite=overwrite)
    atomic_write_json(out_dir / "patch.json", record)
    write_html(out_dir / "patch.html", report["figures"], title=report["title"], header=report["header"])
    _echo_ranked(record, top)
    click.echo(f"wrote {out_dir / 'patch.json'} and {out_dir / 'patch.html'}")


def _patch_report(
    model,
    dataset,
    *,
    method,
    granularity,
    position,
    direction,
    senders,
    receivers,
    iterative,
    threshold,
    ig_steps,
    compare_exact,
    metric,
    engine,
    what,
) -> dict[str, Any]:
    """Run a non-default `patch` (another method, granularity, position or direction): JSON fields, figures."""
    from arithinterp import plots
    from arithinterp.path_patching import iterative_path_patch, parse_components, parse_receivers, path_patch

    n_layers, n_heads = model_dims(model)
    shift = 1.0 if direction == "noising" else 0.0
    rec: dict[str, Any] = {"direction": direction}
    figures = []
    sender_list = parse_components(senders) if senders else None
    if method == "activation":
        from arithinterp.patching import activation_patch

        if granularity == "edge":
            raise ArithInterpError("--granularity edge is for --method attribution or eap-ig; for exact edges use "
                                   "--method path with --receivers.")  # fmt: skip
        granularity = granularity or "components"
        result = activation_patch(model, dataset, granularity=granularity, position=position, direction=direction,
                                  metric=metric, engine=engine)  # fmt: skip
        rec.update({"granularity": granularity, "position": position, "engine": result.info["engine"]})
        title = f"Activation patching ({granularity}, position {position}, {direction}): {what}"
        if granularity == "components" and position == "final":
            figures.append(plots.patching_heatmap(result, n_layers, n_heads, title=title))
        else:
            labels = [model.tokenizer.decode([int(t)]) for t in dataset.clean_tokens[0]]
            figures.append(plots.site_heatmap(result, title=title, position_labels=labels))
    elif method == "path":
        if iterative:
            graph = iterative_path_patch(model, dataset, threshold=threshold, senders=sender_list,
                                         direction=direction, metric=metric, engine=engine)  # fmt: skip
            result = graph.results["logits"]
            rec.update({"granularity": "components", "receivers": "iterative", "threshold": threshold,
                        "edges": graph.edges, "circuit": graph.components(),
                        "engine": result.info["engine"]})  # fmt: skip
            edges = [{**e, "value": e["score"] - shift} for e in graph.edges]
            title = f"Iterative path patching (|effect| >= {threshold}, {direction}): {what}"
        else:
            recv = parse_receivers(receivers)
            result = path_patch(model, dataset, senders=sender_list, receivers=recv, direction=direction,
                                metric=metric, engine=engine)  # fmt: skip
            rec.update({"granularity": "components", "senders": [c.name for c in result.components],
                        "receivers": result.info["receivers"], "engine": result.info["engine"]})  # fmt: skip
            edges = [{"sender": c.name, "receiver": r.name, "value": float(s) - shift}
                     for c, s in zip(result.components, result.scores) for r in recv if r.reads_from(c)]  # fmt: skip
            title = f"Path patching into {', '.join(result.info['receivers'])} ({direction}): {what}"
        into = "the logits" if iterative else ", ".join(result.info["receivers"])
        figures.append(plots.path_graph(edges, n_layers, n_heads, title=title))
        figures.append(plots.patching_heatmap(result, n_layers, n_heads, title=f"Sender scores (into {into})"))
    else:
        from arithinterp.attribution_patching import agreement, attribution_patch
        from arithinterp.patching import patch_components
        from arithinterp.path_patching import patch_edges

        granularity = granularity or ("edge" if method == "eap-ig" else "components")
        if granularity not in ("components", "edge"):
            raise ArithInterpError(f"--granularity {granularity} is not available for --method {method}; "
                                   "choose components or edge.")  # fmt: skip
        if position not in ("final", "all"):
            raise ArithInterpError(f"--position {position} is not available for --method {method}; "
                                   "choose final or all.")  # fmt: skip
        att = attribution_patch(model, dataset, method="atp" if method == "attribution" else "eap-ig",
                                granularity="edge" if granularity == "edge" else "node", position=position,
                                ig_steps=ig_steps, components=sender_list, direction=direction,
                                metric=metric)  # fmt: skip
        result = att.nodes
        rec.update({"granularity": granularity, "position": position, "engine": "gradients",
                    "ig_steps": ig_steps if method == "eap-ig" else None})  # fmt: skip
        if att.edges is not None:
            rec["edges"] = att.edges.ranked()
        if compare_exact:
            exact = patch_components(model, dataset, metric=metric, components=sender_list, direction=direction,
                                     engine=engine) if position == "final" else None  # fmt: skip
            rec["agreement"] = {}
            if exact is not None:
                rec["agreement"]["components"] = agreement(result, exact)
            if att.edges is not None:
                exact_edges = patch_edges(model, dataset, att.edges.components, direction=direction, metric=metric,
                                          engine=engine)  # fmt: skip
                rec["agreement"]["edges"] = agreement(att.edges, exact_edges)
        title = f"Attribution patching ({method}, {granularity}, {direction}): {what}"
        figures.append(plots.patching_heatmap(result, n_layers, n_heads, title=title))
        if att.edges is not None:
            edges = [{"sender": e.sender.name, "receiver": e.receiver.name, "value": float(s) - shift}
                     for e, s in zip(att.edges.components, att.edges.scores)]  # fmt: skip
            strong = [e for e in edges if abs(e["value"]) >= threshold] or edges[:1]
            figures.append(plots.path_graph(strong, n_layers, n_heads, title=f"Edges with |estimate| >= {threshold}"))
    rec.update({"baseline": {"clean": float(result.clean.mean()), "corrupted": float(result.corrupted.mean())},
                "components": result.ranked()})  # fmt: skip
    header = (f"<p>{direction.capitalize()} {method} patching: score = (M_patched - M_corrupted) / (M_clean - "
              f"M_corrupted); 0 = corrupted, 1 = clean. Clean mean {rec['baseline']['clean']:.3f}, corrupted mean "
              f"{rec['baseline']['corrupted']:.3f}.</p>")  # fmt: skip
    return {"record": rec, "figures": figures, "title": title, "header": header}


def _echo_ranked(record: dict[str, Any], top: int) -> None:
    click.echo(f"{record['n']} examples; metric {record['metric']}: clean {record['baseline']['clean']:.3f}, "
               f"corrupted {record['baseline']['corrupted']:.3f}")  # fmt: skip
    width = max([9] + [len(r["name"]) for r in record["components"][:top]])
    click.echo(f"{'rank':>4}  {'component':<{width}} {'score':>8}  95% CI")
    for i, r in enumerate(record["components"][:top], 1):
        click.echo(f"{i:>4}  {r['name']:<{width}} {r['score']:>8.3f}  [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    for e in record.get("edges", [])[:top]:
        click.echo(f"      edge {e['sender']} -> {e['receiver']}: {e['score']:.3f}")
    for what, a in record.get("agreement", {}).items():
        click.echo(f"agreement with exact patching ({what}): Spearman {a['spearman']:.3f} over {a['n']}")


@cli.command()
@model_option
@task_options
@click.option("--fourier", is_flag=True, help="Fourier spectra over number tokens (components, answer, embeddings).")
@click.option("--filter", "filters", multiple=True, metavar="SITE[LAYERS]:BAND", help="Fourier filter to evaluate, "
              "repeatable: attn:high, mlp:low, mlp1:low, attn:k1-3, mlp:p10.")  # fmt: skip
@click.option("--neurons", is_flag=True, help="Also attribute to single MLP neurons.")
@click.option("--compare-patching", is_flag=True, help="Run activation patching and report the rank agreement.")
@click.option("--max-numbers", default=None, type=int, help="Cap on the number axis (GPT-2: 0..361 by default).")
@click.option("--top", default=10, show_default=True, type=int, help="How many ranked components to print.")
@out_options("attribute")
@user_errors
def attribute(model_spec, task, n, seed, style, counterfactual, digits, operand_range, answer_token, only_correct,
              fourier, filters, neurons, compare_patching, max_numbers, top, out, overwrite) -> None:  # fmt: skip
    """Direct logit attribution, logit lens, and (optionally) Fourier spectra and Fourier filters."""
    from arithinterp import plots
    from arithinterp.attribution import AttributeConfig
    from arithinterp.attribution import attribute as run_attribute

    config = AttributeConfig(fourier=fourier, filters=tuple(filters), neurons=neurons,
                             compare_patching=compare_patching, max_numbers=max_numbers)  # fmt: skip
    out_dir = check_out_dir(out or default_out("attribute", model_spec, task), overwrite=overwrite)
    t0 = time.time()
    model, dataset = model_and_dataset(model_spec, only_correct=only_correct, task=task, n=n, seed=seed, style=style,
                                       counterfactual=counterfactual, digits=digits, operand_range=operand_range,
                                       answer_token=answer_token)  # fmt: skip
    report = run_attribute(model, dataset, config)
    body = report.record()
    record = result_header(model_spec=model_spec, task=task, method="direct_logit_attribution",
                           metric=report.metric, dataset=dataset, seed=seed)  # fmt: skip
    record.update({"position": "final", "n_requested": n, "only_correct": only_correct, **body,
                   "examples": dataset.records(), "wall_time_s": round(time.time() - t0, 2)})  # fmt: skip
    prepare_out_dir(out_dir, overwrite=overwrite)
    atomic_write_json(out_dir / "attribute.json", record)
    n_layers, n_heads = model_dims(model)
    what = f"{model_spec}, task {task} ({len(dataset)} examples)"
    figures = [
        plots.dla_heatmap(report.dla, n_layers, n_heads, metric=report.metric, ranked=body["components"],
                          title=f"Direct logit attribution ({report.metric}): {what}"),
        plots.residual_decomposition_bar(body["layers"], title="Residual stream decomposed by layer",
                                         yaxis=report.metric),
        plots.logit_lens_figure(body["logit_lens"], title="Logit lens: the answer read out after each stage"),
    ]  # fmt: skip
    if "fourier" in body:
        fr = body["fourier"]
        comps = {k: fr["components"][k] for k in ["final", "attn", "mlp"] + [f"MLP{i}" for i in range(n_layers)]}
        figures.append(plots.fourier_spectra_figure(comps, title="Spectra of number-token logits written by each site"))
        if fr["answer_digits"]:
            digits_spec = {f"answer token {r['answer_token']}": r for r in fr["answer_digits"]}
            figures.append(plots.fourier_spectra_figure(digits_spec, title="Final residual spectrum by answer token"))
        figures.append(plots.fourier_spectra_figure(fr["embedding"], title="Number-token embedding spectra"))
    if "filters" in body:
        figures.append(plots.error_histogram(body["filters"], title="Errors under Fourier filters"))
    dla_mean = body["baseline"].get(report.metric)
    header = (f"<p>Direct logit attribution at the final position with the final layer norm's cached scale; "
              f"the parts add up to the model's {report.metric} (mean {dla_mean:.3f}; largest sum error "
              f"{max(body['sum_check'].values()):.2e}).</p>")  # fmt: skip
    plots.write_html(out_dir / "attribute.html", figures, title=f"Attribution: {what}", header=header)
    click.echo(f"{len(dataset)} examples; mean {report.metric} {dla_mean:.3f}; "
               f"sum of parts vs model: max error {max(body['sum_check'].values()):.1e}")  # fmt: skip
    click.echo(f"{'rank':>4}  {'part':<11} {'DLA':>8}  95% CI")
    for i, r in enumerate(body["components"][:top], 1):
        click.echo(f"{i:>4}  {r['name']:<11} {r['mean']:>8.3f}  [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
    lens = body["logit_lens"]
    click.echo("logit lens (top-1 share): " + ", ".join(f"{s['stage']} {s['top1']:.2f}" for s in lens))
    if "patching_agreement" in body:
        a = body["patching_agreement"]
        click.echo(f"Spearman with activation patching: signed {a['signed']:.3f}, absolute {a['absolute']:.3f}")
    if "fourier" in body:
        f = body["fourier"]["components"]["final"]
        click.echo(f"final logits over {body['fourier']['numbers']['n']} numbers: low band "
                   f"{f['low_fraction']:.2f}, high band {f['high_fraction']:.2f}, top periods "
                   + ", ".join(f"{p:.3g}" for p in f["top_periods"]))  # fmt: skip
    for f in body.get("filters", []):
        ec = f["error_classes"]
        click.echo(f"filter {f['filter']:<12} accuracy {f['accuracy']:.3f}  off by ±10^k {ec['pm_power_of_10']:.3f}")
    click.echo(f"wrote {out_dir / 'attribute.json'} and {out_dir / 'attribute.html'}")


@cli.command()
@model_option
@click.option(
    "--circuit",
    "circuit_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="circuit.json from `arithinterp localize`: the heads (and MLPs) to train.",
)
@choice("--task", choices=tuple(OPS), default="add", help="Arithmetic task to fine-tune on.")
@click.option("--digits", default=2, show_default=True, type=int, help="Operand digits (digit style).")
@choice(
    "--style",
    choices=STYLES,
    default=None,
    help="Prompt template; default: digits for built-in models, equation otherwise.",
)
@click.option("--range", "operand_range", default=None, type=(int, int), help="Operand range LO HI (inclusive).")
@click.option(
    "--transfer",
    multiple=True,
    help="A transfer distribution as changes to the target, e.g. "
    "'digits=3', 'task=sub', 'style=question' (repeatable; default: digits +-1 or the other styles).",
)
@click.option(
    "--baselines",
    default="full,random,lora",
    show_default=True,
    help="Comma-separated baselines to run beside the selective arm (full, random, lora), or 'none'.",
)
@click.option("--epochs", default=4, show_default=True, type=int)
@click.option("--lr", default=3e-4, show_default=True, type=float)
@click.option("--arm-lr", multiple=True, help="A learning rate for one arm, e.g. 'full=3e-4' (repeatable).")
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--n-train", default=4000, show_default=True, type=int, help="Training problems.")
@click.option("--n-eval", default=300, show_default=True, type=int, help="Held-out problems per distribution.")
@choice("--optimizer", choices=get_args(Optimizer), default="adam")
@click.option(
    "--weight-decay",
    default=0.0,
    show_default=True,
    type=float,
    help="Decoupled weight decay on the trained entries only.",
)
@choice(
    "--grad-scale",
    choices=get_args(GradScale),
    default="none",
    help="heads: multiply the selection's gradients by total heads / selected heads.",
)
@click.option("--with-mlps/--heads-only", default=True, show_default=True, help="Train the circuit's MLPs too.")
@click.option("--retention", default="auto", show_default=True,
              help="Non-arithmetic ability to check: auto, reversal (built-in models), none, or a text file "
                   "(language-model loss).")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--save-baselines", is_flag=True, help="Also save each baseline's model under DIR/arms/.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="New output folder (an interrupted run there resumes).",
)
@click.option("--overwrite", is_flag=True, help="Allow writing into a non-empty --out folder.")
@user_errors
def finetune(model_spec, circuit_path, task, digits, style, operand_range, transfer, baselines, epochs, lr, arm_lr,
             batch_size, n_train, n_eval, optimizer, weight_decay, grad_scale, with_mlps, retention, seed,
             save_baselines, out, overwrite) -> None:  # fmt: skip
    """Fine-tune only a circuit's heads (and MLPs) against full, random-heads and LoRA baselines."""
    from arithinterp.finetune import FinetuneConfig, parse_transfer, read_circuit
    from arithinterp.finetune import finetune as run_finetune
    from arithinterp.tasks import TaskConfig

    components, info = read_circuit(circuit_path)
    target = TaskConfig(task=task, digits=digits, style=style, operand_range=operand_range)
    chosen = () if baselines.strip() == "none" else tuple(b.strip() for b in baselines.split(",") if b.strip())
    try:
        lr_by_arm = tuple((a.split("=")[0].strip(), float(a.split("=")[1])) for a in arm_lr)
    except (IndexError, ValueError):
        raise ArithInterpError(f"--arm-lr {arm_lr!r}: write ARM=RATE, e.g. --arm-lr full=3e-4.") from None
    cfg = FinetuneConfig(
        target=target, transfer=tuple(parse_transfer(t, target) for t in transfer) or "auto", n_train=n_train,
        n_eval=n_eval, epochs=epochs, batch_size=batch_size, lr=lr, lr_by_arm=lr_by_arm, optimizer=optimizer,
        weight_decay=weight_decay,
        grad_scale=grad_scale, include_mlps=with_mlps, baselines=chosen, retention=retention, seed=seed,
        save_baselines=save_baselines,
    )  # fmt: skip
    rec = run_finetune(model_spec, components, out, config=cfg, circuit_info=info | {"path": str(circuit_path)},
                       overwrite=overwrite)  # fmt: skip
    ret = rec["retention"]
    cols = ["target"] + list(rec["before"]["transfer"]) + ([f"retention ({ret['metric']})"] if ret["n"] else [])

    def row(label: str, m: dict, params: str, secs: str) -> str:
        vals = [m["target"], *m["transfer"].values()] + ([m["retention"]] if ret["n"] else [])
        cells = "  ".join(f"{v:>{max(8, len(c))}.3f}" for v, c in zip(vals, cols))
        return f"{label:<10} {params:>12} {secs:>8}  {cells}"

    click.echo(f"{'arm':<10} {'trainable':>12} {'time s':>8}  " + "  ".join(f"{c:>8}" for c in cols))
    click.echo(row("before", rec["before"], "-", "-"))
    for name, arm in rec["arms"].items():
        click.echo(row(name, arm["after"], f"{arm['trainable_parameters']:,}", f"{arm['train_time_s']:.1f}"))
    click.echo(f"wrote the selectively tuned model, finetune.json and finetune.html to {out}")


@cli.command()
@click.option("--task", default="add", show_default=True, help="Training task (see arithinterp.train.TRAIN_TASKS).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output folder for the model.")
@click.option("--resume", default=None, type=click.Path(file_okay=False),
              help="Continue the unfinished run in this folder with the settings it was started with (read from "
                   "its checkpoint); give no --task, --out or --seed. --steps N raises its steps, --set "
                   "steps_per_stage=S the cap of its adaptive stages.")  # fmt: skip
@click.option("--steps", default=None, type=int, help="Training steps (default: the task's).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Allow a non-empty --out (an unfinished run there resumes anyway).")
@click.option("--device", default="cpu", show_default=True, help="Where the steps run: cpu, cuda or cuda:N.")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="Override a training setting (TrainConfig, or for mul4 tasks Mul4Schedule), e.g. --set lr=3e-4 "
                   "--set steps_per_stage=6000 --set advance_at=0.9. Repeatable.")  # fmt: skip
@user_errors
def train(task, out, resume, steps, seed, overwrite, device, settings) -> None:
    """Train a built-in model from scratch. A run is checkpointed as it goes: run the same command again, or
    `arithinterp train --resume FOLDER`, to continue it after an interruption."""
    from dataclasses import replace

    from arithinterp.train import configure, resume_config
    from arithinterp.train import train as run_train

    ctx = click.get_current_context()
    if resume is not None:
        flags = {"task": "--task", "out": "--out", "seed": "--seed", "overwrite": "--overwrite"}
        given = [flag for param, flag in flags.items()
                 if ctx.get_parameter_source(param) is not click.core.ParameterSource.DEFAULT]  # fmt: skip
        given += [f"--set {text}" for text in settings if text.partition("=")[0].strip() != "steps_per_stage"]
        if given:
            raise ArithInterpError(f"--resume {resume} continues a run with the settings it was started with; drop "
                                   f"{', '.join(given)} (only --steps, --set steps_per_stage=S and --device may be "
                                   "given with it).")  # fmt: skip
        cfg, schedule = resume_config(resume)
        cfg, out = (replace(cfg, steps=steps) if steps is not None else cfg), resume
        if settings:  # --set steps_per_stage=S: raise an adaptive run's stage cap (see mul4._extend_steps)
            text = settings[-1].partition("=")[2].strip()
            if schedule is None or not text.isdigit():
                raise ArithInterpError(f"--set {settings[-1]}: steps_per_stage takes a whole number of steps, and "
                                       "only multiplication runs have stages.")  # fmt: skip
            schedule = replace(schedule, steps_per_stage=int(text))
    elif out is None:
        raise ArithInterpError("pass --out FOLDER for a new run, or --resume FOLDER to continue an unfinished one.")
    else:
        extra = [f"seed={seed}"] + ([f"steps={steps}"] if steps is not None else [])
        cfg, schedule = configure(task, [*extra, *settings])
    summary = run_train(cfg, out, overwrite=overwrite, device=device, schedule=schedule)
    click.echo(f"held-out: {summary['held_out']}; train time {summary['train_time_s']} s; wrote {out}")


@cli.command()
@model_option
@task_options
@choice(
    "--method",
    choices=sorted(SCORE_METHODS),
    default="activation",
    help="How components are scored: activation patching, or single-component knockouts.",
)
@choice("--metric", choices=METRICS, default="logit_diff")
@choice(
    "--select",
    "select_how",
    choices=SELECT_HOW,
    default="faithfulness",
    help="top-k (--k), threshold (--threshold, --direction) or the smallest set reaching --target.",
)
@click.option("--k", default=5, show_default=True, type=int, help="Circuit size for --select top-k.")
@click.option(
    "--threshold", default=0.05, show_default=True, type=float, help="Score threshold for --select threshold."
)
@choice(
    "--direction",
    choices=DIRECTIONS,
    default="abs",
    help="Threshold on |score| (abs), score >= t (above) or score <= t (below; knockout drops).",
)
@click.option("--target", default=0.9, show_default=True, type=float, help="Faithfulness for --select faithfulness.")
@choice(
    "--ablation",
    choices=ABLATIONS,
    default="mean",
    help="How removed components are replaced: mean over the prompts, counterfactual run, or zero.",
)
@choice(
    "--baseline",
    choices=BASELINES,
    default="ablated",
    help="Faithfulness 0 point: every component ablated, or the corrupted run.",
)
@choice("--positions", choices=POSITIONS, default="all", help="Ablate at every position or only at the final one.")
@click.option(
    "--n-random", default=100, show_default=True, type=int, help="Random same-size sets for the knockout test."
)
@click.option("--transfer", "transfers", multiple=True, metavar="KEY=VALUE[,...]",
              help="Also locate on a variant dataset and compare, repeatable: answer_token=1, range=0:499, "
                   "counterfactual=random, style=statement, task=sub.")  # fmt: skip
@click.option("--top", default=10, show_default=True, type=int, help="How many ranked components to print.")
@out_options("localize")
@user_errors
def localize(model_spec, task, n, seed, style, counterfactual, digits, operand_range, answer_token, only_correct,
             method, metric, select_how, k, threshold, direction, target, ablation, baseline, positions, n_random,
             transfers, top, out, overwrite) -> None:  # fmt: skip
    """Select a circuit from component scores; measure its faithfulness, necessity and transfer."""
    from arithinterp import plots
    from arithinterp.localize import LocalizeConfig, Selection, parse_transfer_spec, run_localize
    from arithinterp.models import load

    selection = {"top-k": lambda: Selection.top_k(k), "threshold": lambda: Selection.by_threshold(threshold, direction),
                 "faithfulness": lambda: Selection.by_faithfulness(target)}[select_how]()  # fmt: skip
    config = LocalizeConfig(method=method, metric=metric, select=selection, ablation=ablation, baseline=baseline,
                            positions=positions, n_random=n_random, seed=seed)  # fmt: skip
    opts = dict(task=task, n=n, seed=seed, style=style, counterfactual=counterfactual, digits=digits,
                operand_range=operand_range, answer_token=answer_token)  # fmt: skip
    variants = {spec: opts | parse_transfer_spec(spec) for spec in transfers}
    out_dir = check_out_dir(out or default_out("localize", model_spec, task), overwrite=overwrite)
    for v in [opts, *variants.values()]:
        task_config(**v)
    t0 = time.time()
    model = load(model_spec)
    dataset = build_dataset(model, only_correct=only_correct, **opts)
    others = {spec: build_dataset(model, only_correct=only_correct, **v) for spec, v in variants.items()}
    header = result_header(model_spec=model_spec, task=task, method=method, metric=metric, dataset=dataset, seed=seed)
    header["arithinterp_version"] = header.pop("version")  # "version" is circuit.json's schema version
    info = {k_: v for k_, v in header.items() if k_ not in ("model", "task", "method", "metric")}
    info |= {"ablation": ablation, "baseline": baseline, "positions": positions, "n_requested": n,
             "only_correct": only_correct}  # fmt: skip
    report = run_localize(model, dataset, config, transfer_to=others, info=info)
    circuit, nec = report.circuit, report.necessity
    circuit.info.update(examples=dataset.records(), wall_time_s=round(time.time() - t0, 2))
    prepare_out_dir(out_dir, overwrite=overwrite)
    circuit.save(out_dir / "circuit.json")
    n_layers, n_heads = model_dims(model)
    what = f"{model_spec}, task {task} ({len(dataset)} examples, {method} scores, metric {metric})"
    figures = [
        plots.circuit_scores_figure(circuit, n_layers, n_heads, title=f"Component scores and the circuit: {what}"),
        plots.faithfulness_curve_figure(circuit.info["faithfulness_curve"], chosen_k=len(circuit),
                                        target=target if select_how == "faithfulness" else None,
                                        title=f"Faithfulness vs circuit size ({ablation} ablation of the rest)"),
        plots.knockout_vs_random_figure(nec, title=f"Circuit knocked out vs {n_random} random sets of its size"),
    ]  # fmt: skip
    if report.necessity_heads is not None:
        title = f"The circuit's heads knocked out vs {n_random} random head sets of its size (MLPs intact)"
        figures.append(plots.knockout_vs_random_figure(report.necessity_heads, title=title))
    if report.transfer is not None:
        figures.append(plots.transfer_figure(report.transfer, title="Transfer across datasets"))
    fd = circuit.info["faithfulness_details"]
    header_html = (f"<p>Circuit {', '.join(circuit.names)} ({len(circuit)}/{circuit.n_total_components} components). "
                   f"Faithfulness = {fd['definition']}: {circuit.faithfulness:.3f}. Knocked out: accuracy "
                   f"{nec.knockout_accuracy:.3f} vs {nec.random_accuracy_mean:.3f} ± {nec.random_accuracy_std:.3f} "
                   f"for random sets (clean {nec.clean_accuracy:.3f}).</p>")  # fmt: skip
    plots.write_html(out_dir / "localize.html", figures, title=f"Localization: {what}", header=header_html)
    click.echo(f"{len(dataset)} examples; {method} scores, metric {metric}; selection {circuit.select}")
    click.echo(f"{'rank':>4}  {'component':<9} {'score':>8}  in circuit")
    ranked = circuit.to_dict()["ranking"]
    for i, r in enumerate(ranked[:top], 1):
        click.echo(f"{i:>4}  {r['name']:<9} {r['score']:>8.3f}  {'yes' if r['name'] in circuit else ''}")
    click.echo(f"circuit: {', '.join(circuit.names)} = {len(circuit)}/{circuit.n_total_components} components "
               f"({100 * circuit.fraction:.1f}%); faithfulness {circuit.faithfulness:.3f} ({ablation} ablation, "
               f"baseline {baseline}; accuracy with only the circuit {fd['accuracy_circuit']:.3f})")  # fmt: skip
    if select_how == "faithfulness" and not circuit.select.get("target_reached", True):
        click.echo(f"note: no top-ranked set reached faithfulness {target}; kept the most faithful one")
    click.echo(f"knockout: accuracy {nec.clean_accuracy:.3f} -> {nec.knockout_accuracy:.3f} with the circuit "
               f"ablated; random sets of its size: {nec.random_accuracy_mean:.3f} ± {nec.random_accuracy_std:.3f} "
               f"(n={n_random}); circuit percentile {nec.percentile:.1f}")  # fmt: skip
    if report.necessity_heads is not None:
        nh = report.necessity_heads
        click.echo(f"heads only: accuracy {nh.clean_accuracy:.3f} -> {nh.knockout_accuracy:.3f} with "
                   f"{', '.join(nh.circuit)} ablated; random head sets: {nh.random_accuracy_mean:.3f} ± "
                   f"{nh.random_accuracy_std:.3f}; percentile {nh.percentile:.1f}")  # fmt: skip
    if report.transfer is not None:
        t = report.transfer
        for i, name in enumerate(t.names):
            click.echo(f"transfer: circuit of {name!r} = {', '.join(t.circuits[name].names)}; Jaccard with source "
                       f"{float(t.overlap[0, i]):.2f}")  # fmt: skip
        for j, name in enumerate(t.names):
            click.echo(f"  on {name!r}: clean acc {float(t.clean_accuracy[j]):.3f}; source circuit: faithfulness "
                       f"{float(t.faithfulness[0, j]):.3f}, knocked out {float(t.knockout_accuracy[0, j]):.3f} "
                       f"(random {float(t.random_accuracy[0, j]):.3f}); its heads knocked out "
                       f"{float(t.heads_knockout_accuracy[0, j]):.3f} (random heads "
                       f"{float(t.heads_random_accuracy[0, j]):.3f})")  # fmt: skip
    click.echo(f"wrote {out_dir / 'circuit.json'} and {out_dir / 'localize.html'}")


def _positions_option(f):
    return click.option("--positions", "positions_text", default="all", show_default=True,
                        help="Token positions: 'all' or comma-separated indices (negative = from the end), e.g. -1 "
                             "or 8,9,10.")(f)  # fmt: skip


def _parse_positions(text: str) -> tuple[int, ...] | None:
    if text.strip() == "all":
        return None
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ArithInterpError(f"--positions {text!r} is not 'all' or comma-separated integers like 8,9,-1.") from None


def _hook_patterns(hooks: tuple[str, ...]) -> tuple[str, ...]:
    from arithinterp.store import RESIDUAL_HOOKS

    patterns = tuple(h.strip() for text in hooks for h in text.split(",") if h.strip())
    return patterns or RESIDUAL_HOOKS


@cli.command()
@model_option
@task_options
@click.option("--hooks", multiple=True, metavar="NAME|PATTERN",
              help="Hook points to store, repeatable or comma-separated, fnmatch patterns allowed "
                   "(default: blocks.0.hook_resid_pre and blocks.*.hook_resid_post).")  # fmt: skip
@_positions_option
@choice("--dtype", choices=tuple(DTYPES), default="float32")
@click.option("--batch-size", default=512, show_default=True, type=int)
@click.option("--shard-size", default=8192, show_default=True, type=int, help="Examples per shard file.")
@click.option("--stream", is_flag=True, help="Generate the prompts lazily in chunks (memory independent of --n).")
@out_options("store")
@user_errors
def store(model_spec, task, n, seed, style, counterfactual, digits, operand_range, answer_token, only_correct,
          hooks, positions_text, dtype, batch_size, shard_size, stream, out, overwrite) -> None:  # fmt: skip
    """Store activations of chosen hooks and positions in safetensors shards (rerun to resume)."""
    from arithinterp.models import load
    from arithinterp.plots import activation_norms_figure, write_html
    from arithinterp.store import StoreConfig, TaskStream, activation_rms, check_store_dir, write_store

    if stream and only_correct:
        raise ArithInterpError("--stream cannot keep only correctly answered prompts; drop --only-correct.")
    config = StoreConfig(hooks=_hook_patterns(hooks), positions=_parse_positions(positions_text), dtype=dtype,
                         batch_size=batch_size, shard_size=shard_size)  # fmt: skip
    out_dir = check_store_dir(out or default_out("store", model_spec, task), overwrite=overwrite)
    opts = dict(task=task, n=n, seed=seed, style=style, counterfactual=counterfactual, digits=digits,
                operand_range=operand_range, answer_token=answer_token)  # fmt: skip
    tc = task_config(**opts)
    t0 = time.time()
    model = load(model_spec)
    source = TaskStream(model.tokenizer, tc) if stream else build_dataset(model, only_correct=only_correct, **opts)
    result = write_store(model, source, out_dir, config, overwrite=overwrite)
    wall = time.time() - t0
    m = result.manifest
    n_rms = min(result.n, 1000)  # examples the RMS table averages over
    norms = activation_rms(result, max_examples=n_rms)
    record = {
        "model": model_spec, "task": task, "method": "store", "metric": "rms", "n": result.n, "seed": seed,
        "style": m["task"]["style"], "answer_token": answer_token, "dataset_fingerprint": m["dataset_fingerprint"],
        "version": m["version"], "store": str(out_dir), "hooks": m["hooks"], "positions": m["positions"],
        "position_labels": m["position_labels"], "dtype": dtype, "shards": len(m["shards"]),
        "bytes": sum(s["bytes"] for s in m["shards"]), "only_correct": only_correct, "stream": stream,
        "rms_per_hook_position": {h: row.tolist() for h, row in zip(result.hooks, norms)},
        "wall_time_s": round(wall, 2),
    }  # fmt: skip
    atomic_write_json(out_dir / "store.json", record)
    title = f"Activation store: {model_spec}, task {task} ({result.n} examples)"
    labels = [f"{p} {t!r}" for p, t in zip(m["positions"], m["position_labels"])]
    fig = activation_norms_figure(norms, result.hooks, labels, title=f"{title}: RMS activation per hook and "
                                  f"position (first {n_rms} examples)")  # fmt: skip
    write_html(out_dir / "store.html", [fig], title=title,
               header=f"<p>{len(m['shards'])} shards, {record['bytes'] / 1e6:.1f} MB, dtype {dtype}. Read with "
                      f"<code>ActivationStore.open({str(out_dir)!r})</code>.</p>")  # fmt: skip
    click.echo(f"stored {len(result.hooks)} hooks x {len(m['positions'])} positions for {result.n} examples "
               f"({record['bytes'] / 1e6:.1f} MB in {len(m['shards'])} shards) in {wall:.1f} s")  # fmt: skip
    click.echo(f"wrote {out_dir / 'manifest.json'}, {out_dir / 'store.json'} and {out_dir / 'store.html'}")


@cli.command()
@model_option
@task_options
@click.option("--target", required=True, help="Metadata field to probe: a, result, a_digits[0], carries[1], "
              "result_digits[2], partial_products[1][2], ...; with --task mul4 also running-sum, column-sum, carry, "
              "unit-sum or result-digits: value k at the position predicting c_k, for every k.")  # fmt: skip
@click.option("--hook", "hooks", multiple=True, metavar="NAME|PATTERN",
              help="Hook points to probe, repeatable or comma-separated, patterns allowed (default: the residual "
                   "stream entering block 0 and after every block).")  # fmt: skip
@_positions_option
@click.option(
    "--store",
    "store_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Probe an existing activation store instead of running the model (its model and task are used).",
)
@choice("--kind", choices=get_args(ProbeKind), default="auto")
@choice(
    "--estimator",
    choices=get_args(Estimator),
    default="logistic",
    help="Classifier: logistic regression, or a least-squares ridge classifier (faster).",
)
@click.option("--folds", default=5, show_default=True, type=int, help="Cross-validation folds (split by example).")
@choice(
    "--control",
    choices=get_args(Control),
    default="shuffle",
    help="Control probe: shuffled labels, random features, or both.",
)
@click.option("--max-examples", default=2000, show_default=True, type=int, help="Examples used per probe.")
@click.option(
    "--threshold",
    default=0.95,
    show_default=True,
    type=float,
    help="Score at which a target counts as decodable (first_decodable in probe.json).",
)
@out_options("probe")
@user_errors
def probe(model_spec, task, n, seed, style, counterfactual, digits, operand_range, answer_token, only_correct,
          target, hooks, positions_text, store_dir, kind, estimator, folds, control, max_examples, threshold, out,
          overwrite) -> None:  # fmt: skip
    """Linear probes of a metadata target per hook and position, with controls, Fourier fits and PCA.

    With --task mul4, a per-digit field without an index (--target running-sum, column-sum, carry, unit-sum or
    result-digits) probes its value k at the position predicting c_k, for every k and hook (Bai et al.'s ĉ_k probe
    at every depth); that needs the model, not --store.
    """
    from arithinterp.mul4_analysis import digit_field

    if store_dir is not None and digit_field(target) is not None and "[" not in target:
        raise ArithInterpError(f"--target {target} probes each value at the position predicting its output digit, "
                               "which a store does not hold; drop --store (and give --task mul4 --model), or probe "
                               f"one value of the store with --target '{digit_field(target)}[3]'.")  # fmt: skip
    if task == "mul4" and store_dir is None and digit_field(target) is not None:
        ctx = click.get_current_context()
        given = [flag for name, flag in _NOT_PER_DIGIT.items()
                 if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]  # fmt: skip
        if given:
            raise ArithInterpError(f"--target {target} (ridge probes of value k at the position predicting c_k, on "
                                   f"random problems) takes no {', '.join(given)}; drop them, or probe one value at "
                                   f"the prompt's positions with --target '{digit_field(target)}[3]'.")  # fmt: skip
        n = n if ctx.get_parameter_source("n") is not click.core.ParameterSource.DEFAULT else 1000
        _probe_digit_field(model_spec, digit_field(target), n, seed, hooks, folds, out, overwrite)
        return
    from arithinterp.models import load
    from arithinterp.plots import write_html
    from arithinterp.probes import ProbeConfig, hook_label, probe_report, report_figures, target_values
    from arithinterp.store import ActivationStore, StoreConfig, collect

    config = ProbeConfig(kind=kind, estimator=estimator, folds=folds, control=control, max_examples=max_examples,
                         seed=seed)  # fmt: skip
    positions = _parse_positions(positions_text)
    out_dir = check_out_dir(out or default_out("probe", model_spec, task), overwrite=overwrite)
    t0 = time.time()
    if store_dir is not None:
        acts = ActivationStore.open(store_dir)
        target_values(acts, target)  # fail early on a bad target
        m = acts.manifest
        model_spec, task = m["model"], m["task"]["task"]
        try:
            model = load(model_spec)
        except ArithInterpError:
            model = None  # the probes need only the store; the embedding Fourier fit is skipped
        record = {"model": model_spec, "task": task, "method": "linear-probe", "n": acts.n,
                  "seed": m["task"]["seed"], "style": m["task"]["style"], "answer_token": m["task"]["answer_token"],
                  "dataset_fingerprint": m["dataset_fingerprint"], "version": _version(),
                  "store": str(store_dir)}  # fmt: skip
        probe_hooks = None if not hooks else _match(acts.hooks, _hook_patterns(hooks))
    else:
        opts = dict(task=task, n=n, seed=seed, style=style, counterfactual=counterfactual, digits=digits,
                    operand_range=operand_range, answer_token=answer_token)  # fmt: skip
        model, dataset = model_and_dataset(model_spec, only_correct=only_correct, **opts)
        target_values(dataset, target)
        acts = collect(model, dataset, StoreConfig(hooks=_hook_patterns(hooks), positions=positions))
        positions = None
        record = result_header(model_spec=model_spec, task=task, method="linear-probe", metric="", dataset=dataset,
                               seed=seed)  # fmt: skip
        probe_hooks = None
    report = probe_report(acts, target, model=model, hooks=probe_hooks, positions=positions, config=config,
                          threshold=threshold)  # fmt: skip
    body = report.record()
    record.update({"metric": body["score_metric"], "only_correct": only_correct, **body,
                   "wall_time_s": round(time.time() - t0, 2)})  # fmt: skip
    prepare_out_dir(out_dir, overwrite=overwrite)
    atomic_write_json(out_dir / "probe.json", record)
    title = f"Probe {target}: {model_spec}, task {task}"
    r = report.result
    header = (f"<p>Held-out {r.metric} of a linear probe ({body['probe']['estimator']}, {folds}-fold CV split by "
              f"example, {r.n_examples} examples); controls: {', '.join(r.config.controls)}; chance "
              f"{r.chance:.3f}.</p>")  # fmt: skip
    write_html(out_dir / "probe.html", report_figures(report, title=title), title=title, header=header)
    click.echo(f"probe {target} ({r.kind}, held-out {r.metric}, {r.n_examples} examples; chance {r.chance:.3f})")
    click.echo(f"{'hook':<28} " + " ".join(f"{f'{p}{t!r}':>8}" for p, t in zip(r.positions, r.position_labels)))
    for h, hook in enumerate(r.hooks):
        click.echo(f"{hook_label(hook):<28} " + " ".join(f"{v:>8.3f}" for v in r.score[h]))
    for c, values in r.control.items():
        click.echo(f"control ({c}): max {float(values.max()):.3f}, mean {float(values.mean()):.3f}")
    best = body["best"]
    click.echo(f"best: {best['hook']} at position {best['position']}: {best['score']:.3f}")
    for name, fit in report.fourier.items():
        click.echo(f"Fourier {name}: median R² {fit.median_r2:.3f} (full basis {fit.median_r2_full:.3f}, "
                   f"random-basis control {fit.control_r2:.3f})")  # fmt: skip
    click.echo(f"wrote {out_dir / 'probe.json'} and {out_dir / 'probe.html'}")


MUL4_MODEL_HELP = "A 4x4 multiplication model: icot-mul4, sft-mul4, aux-mul4, or a folder trained likewise."


@cli.command("mul4-analyze")
@click.option("--model", "model_spec", default="icot-mul4", show_default=True, help=MUL4_MODEL_HELP)
@click.option("--n", default=1000, show_default=True, type=int, help="Problems (uniform 4-digit operands).")
@click.option("--seed", default=1, show_default=True, type=int, help="Problem seed.")
@click.option("--digit", default=3, show_default=True, type=int, help="Output digit c_k for the Fourier fit and PCA.")
@out_options("mul4-analyze")
@user_errors
def mul4_analyze(model_spec, n, seed, digit, out, overwrite) -> None:
    """Bai et al.'s analyses of a multiplication model: digit-swap attribution, running-sum and partial-product
    probes, the attention graph, Fourier fits and PCA of digit representations."""
    from arithinterp.models import load
    from arithinterp.mul4_analysis import Mul4AnalysisConfig, figures, run_all
    from arithinterp.plots import write_html

    config = Mul4AnalysisConfig(n=n, seed=seed, pca_digit=digit, fourier_digit=digit)
    out_dir = check_out_dir(out or default_out("mul4-analyze", model_spec, "mul4"), overwrite=overwrite)
    t0 = time.time()
    model = load(model_spec)
    report = run_all(model, config)
    record = {"model": model_spec, "task": "mul4", "method": "mul4-analyze", "metric": "", "n": n, "seed": seed,
              "version": _version(), **report.record(), "wall_time_s": round(time.time() - t0, 2)}  # fmt: skip
    prepare_out_dir(out_dir, overwrite=overwrite)
    atomic_write_json(out_dir / "mul4-analyze.json", record)
    title = f"4x4 multiplication analyses: {model_spec} ({n} problems)"
    acc = record["accuracy"]
    header = (f"<p>Exact match {acc['exact_match']:.3f}, digit accuracy {acc['digit_accuracy']:.3f} (teacher-forced "
              "argmax). Output digit c_k is predicted at the token before it; all numbers least significant digit "
              "first.</p>")  # fmt: skip
    write_html(out_dir / "mul4-analyze.html", figures(report, title=model_spec), title=title, header=header)
    rs, mi = record["running_sum_probe"], record["running_sum_probe_mlp_in"]
    click.echo(f"{model_spec}: exact match {acc['exact_match']:.3f}, digit accuracy {acc['digit_accuracy']:.3f}")
    lines = [("", " ".join(f"{f'c{k}':>6}" for k in range(8))),
             ("model's own c_k (teacher-forced)", _row(acc["digit_accuracy_per_k"], "6.3f"))]  # fmt: skip
    for p, where in ((rs, "after attention"), (mi, "MLP input, after its LayerNorm")):
        lines += [(f"ĉ_k probe at {p['hook']} ({where})", ""), ("  held-out MAE", _row(p["mae_per_k"], "6.1f")),
                  ("  round(prediction) mod 10 = c_k", _row(p["readout_accuracy_per_k"], "6.3f"))]  # fmt: skip
    lines += [("shuffled-label control MAE", _row(rs["control_mae_per_k"], "6.1f")),
              ("LayerNorm scale std/mean", _row(mi["ln_scale_cv_per_k"], "6.3f"))]  # fmt: skip
    for label, values in lines:
        click.echo(f"  {label}" if not values else f"  {label:<34}{values}")
    for name, fit in record["fourier"].items():
        click.echo(f"Fourier fit (periods 10, 5, 2) of {name}: median R² over dimensions {fit['median_r2_dims']:.3f} "
                   f"(random-basis control {fit['control_r2']:.3f})")  # fmt: skip
    click.echo(f"wrote {out_dir / 'mul4-analyze.json'} and {out_dir / 'mul4-analyze.html'}")


#: `probe` options that the per-digit mul4 probe (`_probe_digit_field`) has no use for
_NOT_PER_DIGIT = {"style": "--style", "counterfactual": "--counterfactual", "digits": "--digits",
                  "operand_range": "--range", "answer_token": "--answer-token", "only_correct": "--only-correct",
                  "positions_text": "--positions", "kind": "--kind", "estimator": "--estimator", "control": "--control",
                  "max_examples": "--max-examples", "threshold": "--threshold"}  # fmt: skip


def _probe_digit_field(model_spec: str, field: str, n: int, seed: int, hooks: tuple[str, ...], folds: int,
                       out: str | None, overwrite: bool) -> None:  # fmt: skip
    """`probe --task mul4 --target running-sum` (or another `mul4_analysis.DIGIT_FIELDS` field)."""
    from arithinterp.models import load
    from arithinterp.mul4_analysis import digit_field_figure, digit_field_probes, one_thread, problems, residual_hooks
    from arithinterp.plots import write_html

    out_dir = check_out_dir(out or default_out("probe", model_spec, "mul4"), overwrite=overwrite)
    t0 = time.time()
    model = load(model_spec)
    layers = range(model.cfg.n_layers)
    chosen = None
    if hooks:
        names = ["blocks.0.hook_resid_pre", *residual_hooks(model), *(f"blocks.{i}.hook_attn_out" for i in layers),
                 *(f"blocks.{i}.hook_mlp_out" for i in layers)]  # fmt: skip
        chosen = _match(names, _hook_patterns(hooks))
    a, b = problems(n, seed)
    with one_thread():
        probe = digit_field_probes(model, a, b, field, hooks=chosen, folds=folds)
    record = {"model": model_spec, "task": "mul4", "method": "linear-probe", "metric": "mae", "n": n, "seed": seed,
              "target": field, "probe": {"estimator": "ridge", "alpha": 1.0, "folds": folds}, "version": _version(),
              **probe.record(), "wall_time_s": round(time.time() - t0, 2)}  # fmt: skip
    prepare_out_dir(out_dir, overwrite=overwrite)
    atomic_write_json(out_dir / "probe.json", record)
    title = f"Probe {field} per output digit: {model_spec}"
    header = (f"<p>Ridge probes ({folds}-fold cross-validation over {n} problems) of {field} at the position "
              "predicting each output digit c_k, in the teacher-forced no-cot format; the control refits on "
              "shuffled labels.</p>")  # fmt: skip
    write_html(out_dir / "probe.html", [digit_field_figure(probe, title=model_spec)], title=title, header=header)
    click.echo(f"probe {field} at the position predicting c_k ({n} problems, held-out MAE; R² in probe.json)")
    click.echo(f"  {'':28}" + " ".join(f"{f'c{k}':>6}" for k in range(8)))
    for hook, row in zip(probe.hooks, probe.mae):
        click.echo(f"  {hook:<28}{_row(row, '6.2f')}")
    click.echo(f"  {'mean |value - mean| (guess)':<28}{_row(probe.mean_abs_deviation, '6.2f')}")
    click.echo(f"  {'shuffled control, last hook':<28}{_row(probe.control_mae[-1], '6.2f')}")
    click.echo(f"wrote {out_dir / 'probe.json'} and {out_dir / 'probe.html'}")


def _row(values, fmt: str) -> str:
    return " ".join(f"{v:{fmt}}" for v in values)


def _match(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    import fnmatch

    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ArithInterpError(f"--hook {', '.join(patterns)} matches none of the store's hooks: {', '.join(names)}.")
    return chosen


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
