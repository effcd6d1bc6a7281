"""Localization: from per-component scores to a circuit, and the numbers that make it believable.

A patching (or attribution, or knockout) sweep gives every head and MLP a score. `localize` ranks the
components by |score| and keeps a few of them - the top k, those past a threshold, or the smallest top-ranked
set whose faithfulness reaches a target - as a `Circuit` (`arithinterp.circuit`: the set, its scores and its
`circuit.json` file). Then:

* **Faithfulness** (does the circuit suffice?): run the clean prompts with every component *outside* the
  circuit ablated and see how much of the model's behaviour survives. With M the mean metric over the
  clean prompts (default `logit_diff`: answer logit minus counterfactual-answer logit at the final position)::

      faithfulness = (M_circuit - M_baseline) / (M_full - M_baseline)

  `M_full`: the unablated model; `M_circuit`: every component not in the circuit ablated. `M_baseline` is,
  with `baseline="ablated"` (the default), every head and MLP ablated - so 1 = the circuit alone does what
  the whole model does, 0 = no better than nothing; with `baseline="corrupted"`, the unablated model on the
  counterfactual prompts - the clean-vs-corrupted normalisation of the patching scores (0 = corrupted run).
* **Necessity** (is the circuit needed?): knock the circuit out (ablate only its components) and compare the
  accuracy with knocking out many random sets of the same size (same numbers of heads and MLPs): their mean,
  spread, and the circuit's percentile among them.
* **Transfer**: locate on one dataset (template style, operator, operand range, answer digit), evaluate on
  others: Jaccard overlap of the selected sets and each circuit's faithfulness and knockout effect elsewhere.

Ablation (`arithinterp.ablation`) replaces a head's output `hook_z` or an MLP's output `hook_mlp_out` by its
mean over the prompts (`"mean"`, the default), its value on the counterfactual prompt (`"resample"`) or zero
(`"zero"`), at every position or only the final one; many component sets are evaluated in one batched pass.

Axis names: `set` (one component set per row), `batch`, `pos`, `layer`, `head`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp._errors import ArithInterpError, check_choice
from arithinterp.ablation import (
    ABLATIONS,
    POSITIONS,
    Ablation,
    AblationEngine,
    AblationRuns,
    Positions,
    run_ablations,
)

# Circuit, Selection and the score helpers live in arithinterp.circuit; localize re-exports the public ones.
from arithinterp.circuit import (
    Circuit,
    ScoreLike,
    Selection,
    _model_order,
    as_components,
    as_scores,
    jaccard,
    rank,
    select_components,
)
from arithinterp.patching import Component, all_components, model_dims
from arithinterp.tasks import Dataset

BASELINES = ("ablated", "corrupted")

Baseline = Literal["ablated", "corrupted"]

FAITHFULNESS_DEFINITION = {
    "ablated": "(M_circuit - M_all_ablated) / (M_full - M_all_ablated); M = mean metric over the clean prompts, "
    "M_circuit = every component outside the circuit ablated, M_all_ablated = every head and MLP ablated",
    "corrupted": "(M_circuit - M_corrupted) / (M_full - M_corrupted); M = mean metric, M_circuit = clean prompts "
    "with every component outside the circuit ablated, M_corrupted = the unablated model on the counterfactual prompts",
}


# ---------------------------------------------------------------------------------------------------------
# Faithfulness


@dataclass(frozen=True, kw_only=True)
class Faithfulness:
    """Faithfulness of one component set (definition in the module docstring and in `definition`)."""

    score: float
    m_circuit: float
    m_full: float
    m_baseline: float
    baseline: str
    ablation: str
    positions: str
    metric: str
    n_components: int
    accuracy_circuit: float  # accuracy with everything outside the circuit ablated
    accuracy_full: float

    @property
    def definition(self) -> str:
        return FAITHFULNESS_DEFINITION[self.baseline]

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score, "definition": self.definition, "baseline": self.baseline,
            "ablation": self.ablation, "positions": self.positions, "metric": self.metric,
            "m_circuit": self.m_circuit, "m_full": self.m_full, "m_baseline": self.m_baseline,
            "accuracy_circuit": self.accuracy_circuit, "accuracy_full": self.accuracy_full,
            "n_components": self.n_components,
        }  # fmt: skip


def _faithfulness_scores(runs: AblationRuns, baseline: str, empty_row: int) -> tuple[Tensor, float]:
    """Faithfulness of every row of `runs` (the rows ablate complements) and M_baseline."""
    m_full = float(runs.full.mean())
    m_base = float(runs.values[empty_row].mean()) if baseline == "ablated" else float(runs.corrupted.mean())
    denom = m_full - m_base
    if abs(denom) < 1e-6 * max(1.0, abs(m_full)):
        what = "ablating every component" if baseline == "ablated" else "the counterfactual prompts"
        raise ArithInterpError(
            f"faithfulness is undefined here: {what} leaves the mean {runs.metric} unchanged "
            f"({m_full:.4g} vs {m_base:.4g}); use another --baseline, --ablation or --metric."
        )
    return (runs.values.mean(-1) - m_base) / denom, m_base


def faithfulness_curve(
    model,
    dataset: Dataset,
    circuits: Sequence[Iterable[Component | str]],
    *,
    ablation: Ablation = "mean",
    baseline: Baseline = "ablated",
    metric: str = "logit_diff",
    positions: Positions = "all",
    reference: Dataset | None = None,
    engine: AblationEngine = "auto",
    progress: bool = False,
) -> list[Faithfulness]:
    """Faithfulness of several component sets in one batched evaluation (see the module docstring)."""
    check_choice("baseline", baseline, BASELINES)
    everything = all_components(*model_dims(model))
    complements = [[c for c in everything if c not in set(as_components(circ))] for circ in circuits]
    runs = run_ablations(model, dataset, complements + [everything], ablation=ablation, metric=metric,
                         positions=positions, reference=reference, engine=engine, progress=progress)  # fmt: skip
    scores, m_base = _faithfulness_scores(runs, baseline, len(complements))
    return [
        Faithfulness(
            score=float(scores[i]),
            m_circuit=float(runs.values[i].mean()),
            m_full=float(runs.full.mean()),
            m_baseline=m_base,
            baseline=baseline,
            ablation=ablation,
            positions=positions,
            metric=metric,
            n_components=len(set(as_components(circ))),
            accuracy_circuit=float(runs.correct[i].mean()),
            accuracy_full=float(runs.full_correct.mean()),
        )  # fmt: skip
        for i, circ in enumerate(circuits)
    ]


def faithfulness(model, dataset: Dataset, circuit: Circuit | Iterable[Component | str], **kwargs: Any) -> Faithfulness:
    """Faithfulness of one circuit; keyword arguments as in `faithfulness_curve`."""
    return faithfulness_curve(model, dataset, [as_components(circuit)], **kwargs)[0]


# ---------------------------------------------------------------------------------------------------------
# Necessity: knock the circuit out vs random same-size sets


@dataclass(frozen=True, kw_only=True)
class Necessity:
    """Accuracy and metric with the circuit knocked out, against random sets of the same size and make-up.

    `percentile` is the circuit's mid-rank percentile among the random sets' knocked-out accuracies
    (100 x (#random below + #random equal / 2) / n_random): near 0 = knocking out the circuit hurts more than
    almost any random set of its size. `frac_random_as_damaging` = fraction of random sets whose knock-out
    accuracy is <= the circuit's.
    """

    circuit: tuple[str, ...]
    ablation: str
    positions: str
    metric: str
    clean_accuracy: float
    knockout_accuracy: float
    clean_metric: float
    knockout_metric: float
    random_sets: tuple[tuple[str, ...], ...]
    random_accuracy: Float[Tensor, " random"]
    random_metric: Float[Tensor, " random"]

    @property
    def random_accuracy_mean(self) -> float:
        return float(self.random_accuracy.mean())

    @property
    def random_accuracy_std(self) -> float:
        return float(self.random_accuracy.std()) if len(self.random_accuracy) > 1 else 0.0

    @property
    def percentile(self) -> float:
        r, c = self.random_accuracy, self.knockout_accuracy
        return float(100 * ((r < c).float().mean() + 0.5 * (r == c).float().mean()))

    @property
    def frac_random_as_damaging(self) -> float:
        return float((self.random_accuracy <= self.knockout_accuracy).float().mean())

    def to_dict(self) -> dict[str, Any]:
        r = self.random_accuracy
        return {
            "circuit": list(self.circuit), "ablation": self.ablation, "positions": self.positions,
            "metric": self.metric, "clean_accuracy": self.clean_accuracy,
            "knockout_accuracy": self.knockout_accuracy, "clean_metric": self.clean_metric,
            "knockout_metric": self.knockout_metric, "n_random": len(r),
            "random_accuracy": {"mean": self.random_accuracy_mean, "std": self.random_accuracy_std,
                                "min": float(r.min()), "max": float(r.max()),
                                "quantiles_5_50_95": torch.quantile(r, torch.tensor([0.05, 0.5, 0.95])).tolist()},
            "random_metric": {"mean": float(self.random_metric.mean()),
                              "std": float(self.random_metric.std()) if len(r) > 1 else 0.0},
            "percentile": self.percentile, "frac_random_as_damaging": self.frac_random_as_damaging,
            "random_accuracy_values": r.tolist(),
        }  # fmt: skip


def random_sets(
    circuit: Sequence[Component], n_layers: int, n_heads: int, n: int, *, seed: int = 0, match_kinds: bool = True
) -> list[list[Component]]:
    """`n` random component sets of the circuit's size (with `match_kinds`: as many heads and MLPs)."""
    everything = all_components(n_layers, n_heads)
    g = torch.Generator().manual_seed(seed)
    pools = [[c for c in everything if c.kind == k] for k in ("head", "mlp")] if match_kinds else [everything]
    sizes = [sum(c.kind == k for c in circuit) for k in ("head", "mlp")] if match_kinds else [len(circuit)]
    out = []
    for _ in range(n):
        chosen: list[Component] = []
        for pool, size in zip(pools, sizes):
            chosen += [pool[i] for i in torch.randperm(len(pool), generator=g)[:size].tolist()]
        out.append(sorted(chosen, key=_model_order))
    return out


def necessity(
    model,
    dataset: Dataset,
    circuit: Circuit | Iterable[Component | str],
    *,
    n_random: int = 100,
    seed: int = 0,
    match_kinds: bool = True,
    ablation: Ablation = "mean",
    metric: str = "logit_diff",
    positions: Positions = "all",
    reference: Dataset | None = None,
    engine: AblationEngine = "auto",
    progress: bool = False,
) -> Necessity:
    """Knock out the circuit and `n_random` random same-size sets; see `Necessity`."""
    if n_random < 1:
        raise ArithInterpError(f"n_random={n_random}: pass at least 1 random set (e.g. 100).")
    comps = sorted(set(as_components(circuit)), key=_model_order)
    n_layers, n_heads = model_dims(model)
    rand = random_sets(comps, n_layers, n_heads, n_random, seed=seed, match_kinds=match_kinds)
    runs = run_ablations(model, dataset, [comps] + rand, ablation=ablation, metric=metric, positions=positions,
                         reference=reference, engine=engine, progress=progress)  # fmt: skip
    acc, val = runs.correct.mean(-1), runs.values.mean(-1)
    return Necessity(
        circuit=tuple(c.name for c in comps), ablation=ablation, positions=positions, metric=metric,
        clean_accuracy=float(runs.full_correct.mean()), knockout_accuracy=float(acc[0]),
        clean_metric=float(runs.full.mean()), knockout_metric=float(val[0]),
        random_sets=tuple(tuple(c.name for c in s) for s in rand), random_accuracy=acc[1:], random_metric=val[1:],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Score methods (a registry: CLI choices come from here)

ScoreMethod = Callable[..., ScoreLike]
SCORE_METHODS: dict[str, ScoreMethod] = {}


def register_score_method(name: str, fn: ScoreMethod) -> None:
    """Register `fn(model, dataset, *, metric, ablation, progress) -> ScoreLike` under `name` (no duplicates)."""
    if name in SCORE_METHODS:
        raise ArithInterpError(f"score method {name!r} is already registered; pick another name.")
    SCORE_METHODS[name] = fn


def _activation_scores(model, dataset: Dataset, *, metric: str, ablation: str, progress: bool) -> ScoreLike:
    from arithinterp.patching import patch_components

    return patch_components(model, dataset, metric=metric, progress=progress)


def knockout_scores(
    model, dataset: Dataset, *, metric: str = "answer_logit", ablation: Ablation = "mean", progress: bool = False
) -> dict[Component, float]:
    """Relative change of the mean metric when each component alone is ablated (at all positions).

    score = (M_without_c - M_full) / |M_full|: with `metric="answer_logit"`, -0.05 is a 5% drop of the
    answer logit - select with `Selection.by_threshold(-0.05, direction="below")`.
    """
    comps = all_components(*model_dims(model))
    runs = run_ablations(model, dataset, [[c] for c in comps], ablation=ablation, metric=metric, progress=progress)
    m_full = float(runs.full.mean())
    if abs(m_full) < 1e-12:
        raise ArithInterpError(
            f"the mean {metric} of the full model is 0, so relative changes are undefined; use another --metric."
        )
    return {c: float(v) for c, v in zip(comps, (runs.values.mean(-1) - m_full) / abs(m_full))}


def _attribution_scores(kind: str) -> ScoreMethod:
    def scores(model, dataset: Dataset, *, metric: str, ablation: str, progress: bool) -> ScoreLike:
        from arithinterp.attribution_patching import attribution_patch

        return attribution_patch(model, dataset, method=kind, metric=metric, progress=progress).nodes

    return scores


register_score_method("activation", _activation_scores)
register_score_method("knockout", knockout_scores)
register_score_method("atp", _attribution_scores("atp"))
register_score_method("eap-ig", _attribution_scores("eap-ig"))


def component_scores(
    model, dataset: Dataset, *, method: str = "activation", metric: str = "logit_diff", ablation: Ablation = "mean",
    progress: bool = False,
) -> ScoreLike:  # fmt: skip
    """Score every head and MLP with a registered method (`SCORE_METHODS`)."""
    check_choice("score method", method, tuple(SCORE_METHODS))
    return SCORE_METHODS[method](model, dataset, metric=metric, ablation=ablation, progress=progress)


# ---------------------------------------------------------------------------------------------------------
# Choosing the circuit


def localize(
    scores: ScoreLike,
    *,
    select: Selection,
    model=None,
    dataset: Dataset | None = None,
    ablation: Ablation = "mean",
    baseline: Baseline = "ablated",
    positions: Positions = "all",
    reference: Dataset | None = None,
    metric: str | None = None,
    method: str | None = None,
    curve_max_k: int | None = 64,
    engine: AblationEngine = "auto",
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Circuit:
    """Choose a circuit from any per-component scores and, given a model and dataset, measure its faithfulness.

    With `model` and `dataset`, the faithfulness of every top-ranked prefix of size 0..`curve_max_k` (the
    curve behind "faithfulness vs circuit size") is computed in one batched run and stored in
    `info["faithfulness_curve"]`, and the chosen set's faithfulness in `faithfulness`. `metric` defaults to
    the scores' own (`PatchResult.metric`) or logit_diff; `method` to the scores' engine name or "custom".
    """
    s = as_scores(scores)
    metric = metric or getattr(getattr(scores, "nodes", scores), "metric", None) or "logit_diff"
    info_of = getattr(getattr(scores, "nodes", scores), "info", None) or {}
    method = method or info_of.get("method") or ("activation" if hasattr(scores, "patched") else "custom")
    ranked = rank(s)
    sel_record = select.params()
    record_info: dict[str, Any] = dict(info or {})
    faith: Faithfulness | None = None
    if model is None or dataset is None:
        if select.how == "faithfulness":
            raise ArithInterpError("faithfulness selection runs the model; pass model= and dataset= to localize.")
        chosen = select_components(s, select)
        n_total = len(s)
    else:
        n_layers, n_heads = model_dims(model)
        n_total = n_layers * (n_heads + 1)
        max_k = len(ranked) if curve_max_k is None else min(len(ranked), curve_max_k)
        if select.how == "faithfulness":
            max_k = len(ranked) if select.max_k is None else min(len(ranked), select.max_k)
        prefixes = [ranked[:k] for k in range(max_k + 1)]
        chosen_fixed = None if select.how == "faithfulness" else select_components(s, select)
        circuits = prefixes + ([chosen_fixed] if chosen_fixed is not None else [])
        results = faithfulness_curve(
            model, dataset, circuits, ablation=ablation, baseline=baseline, metric=metric, positions=positions,
            reference=reference, engine=engine, progress=progress,
        )  # fmt: skip
        curve = [
            {"k": k, "faithfulness": r.score, "accuracy": r.accuracy_circuit}
            for k, r in enumerate(results[: max_k + 1])
        ]
        if select.how == "faithfulness":
            reached = [k for k in range(1, max_k + 1) if results[k].score >= select.target]
            k = reached[0] if reached else max(range(1, max_k + 1), key=lambda k: results[k].score)
            chosen, faith = prefixes[k], results[k]
            sel_record |= {"target_reached": bool(reached)}
        else:
            chosen, faith = chosen_fixed, results[-1]
        record_info["faithfulness_curve"] = curve
        record_info["faithfulness_definition"] = faith.definition
        record_info["faithfulness_details"] = faith.to_dict()
        record_info.setdefault("n", len(dataset))
        record_info.setdefault("dataset_fingerprint", dataset.fingerprint())
    return Circuit(
        model=str(getattr(model, "arithinterp_spec", record_info.get("model", "unknown"))),
        task=dataset.config.task if dataset is not None else str(record_info.get("task", "unknown")),
        method=method, metric=metric, select=sel_record, components=tuple(chosen),
        scores={c.name: v for c, v in s.items()}, n_total_components=n_total,
        faithfulness=None if faith is None else faith.score, info=record_info,
    )  # fmt: skip


def locate(
    model,
    dataset: Dataset,
    *,
    method: str = "activation",
    select: Selection | None = None,
    metric: str = "logit_diff",
    ablation: Ablation = "mean",
    baseline: Baseline = "ablated",
    positions: Positions = "all",
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Circuit:
    """Score every component with `method`, then `localize` (default selection: faithfulness >= 0.9)."""
    scores = component_scores(model, dataset, method=method, metric=metric, ablation=ablation, progress=progress)
    return localize(
        scores, select=select or Selection.by_faithfulness(0.9), model=model, dataset=dataset, ablation=ablation,
        baseline=baseline, positions=positions, metric=metric, method=method, info=info, progress=progress,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Transfer


@dataclass(kw_only=True)
class Transfer:
    """Circuits located on several datasets, each evaluated on every dataset.

    Rows index circuits (`names`, located on the dataset of the same name), columns datasets. `overlap` is the
    Jaccard index of the circuits' component sets; `faithfulness[i, j]` circuit i's faithfulness on dataset j;
    `knockout_accuracy[i, j]` dataset j's accuracy with circuit i knocked out, `random_accuracy[i, j]` the mean
    over random sets of circuit i's size and make-up; `clean_accuracy[j]` the unablated accuracy.
    `heads_knockout_accuracy` / `heads_random_accuracy`: the same with only circuit i's heads knocked out, against
    random head sets of that size (MLPs intact) - the informative comparison when a circuit holds every MLP.
    """

    names: list[str]
    circuits: dict[str, Circuit]
    overlap: Float[Tensor, "circuit circuit"]
    faithfulness: Float[Tensor, "circuit dataset"]
    knockout_accuracy: Float[Tensor, "circuit dataset"]
    random_accuracy: Float[Tensor, "circuit dataset"]
    clean_accuracy: Float[Tensor, " dataset"]
    heads_knockout_accuracy: Float[Tensor, "circuit dataset"]
    heads_random_accuracy: Float[Tensor, "circuit dataset"]
    n_random: int
    ablation: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names, "ablation": self.ablation, "n_random": self.n_random,
            "circuits": {n: c.names for n, c in self.circuits.items()},
            "overlap_jaccard": self.overlap.tolist(), "faithfulness": self.faithfulness.tolist(),
            "knockout_accuracy": self.knockout_accuracy.tolist(), "random_accuracy": self.random_accuracy.tolist(),
            "clean_accuracy": self.clean_accuracy.tolist(),
            "heads_knockout_accuracy": self.heads_knockout_accuracy.tolist(),
            "heads_random_accuracy": self.heads_random_accuracy.tolist(),
        }  # fmt: skip


def transfer(
    model,
    datasets: Mapping[str, Dataset],
    *,
    circuits: Mapping[str, Circuit] | None = None,
    method: str = "activation",
    select: Selection | None = None,
    metric: str = "logit_diff",
    ablation: Ablation = "mean",
    baseline: Baseline = "ablated",
    positions: Positions = "all",
    n_random: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> Transfer:
    """Locate a circuit on each dataset (where `circuits` has none) and evaluate every circuit on every dataset.

    Random sets are matched in size and make-up to each circuit (`random_sets`), `n_random` per circuit.
    """
    names = list(datasets)
    if not names:
        raise ArithInterpError("transfer needs at least one dataset.")
    if n_random < 1:
        raise ArithInterpError(f"n_random={n_random}: pass at least 1 random set.")
    unknown = [n for n in (circuits or {}) if n not in datasets]
    if unknown:
        raise ArithInterpError(f"circuit(s) {', '.join(unknown)} name no dataset; use the dataset names as keys.")
    given = dict(circuits or {})
    circuits = {
        n: given[n] if n in given else locate(model, ds, method=method, select=select, metric=metric,
                                              ablation=ablation, baseline=baseline, positions=positions)
        for n, ds in tqdm(datasets.items(), desc="locating", disable=not progress)
    }  # fmt: skip
    k = len(names)
    n_layers, n_heads = model_dims(model)
    everything = all_components(n_layers, n_heads)
    members = [set(as_components(circuits[n])) for n in names]
    complements = [[c for c in everything if c not in m] for m in members]
    knockouts = [sorted(m, key=_model_order) for m in members]
    head_kos = [[c for c in ko_ if c.kind == "head"] for ko_ in knockouts]
    rand = [random_sets(ko_, n_layers, n_heads, n_random, seed=seed) for ko_ in knockouts + head_kos]
    overlap = torch.tensor([[jaccard(circuits[a], circuits[b]) for b in names] for a in names])
    faith, ko, rnd, clean = torch.empty(k, k), torch.empty(k, k), torch.empty(k, k), torch.empty(k)
    hko, hrnd = torch.empty(k, k), torch.empty(k, k)
    for j, dn in enumerate(names):  # every set for dataset j in one batched evaluation
        sets = complements + [everything] + knockouts + head_kos + [s for r in rand for s in r]
        runs = run_ablations(model, datasets[dn], sets, ablation=ablation, metric=metric, positions=positions)
        f, _ = _faithfulness_scores(runs, baseline, k)
        acc = runs.correct.mean(-1)
        faith[:, j] = f[:k]
        ko[:, j], hko[:, j] = acc[k + 1 : 2 * k + 1], acc[2 * k + 1 : 3 * k + 1]
        r = acc[3 * k + 1 :].reshape(2 * k, n_random).mean(-1)
        rnd[:, j], hrnd[:, j] = r[:k], r[k:]
        clean[j] = runs.full_correct.mean()
    return Transfer(names=names, circuits=dict(circuits), overlap=overlap, faithfulness=faith, knockout_accuracy=ko,
                    random_accuracy=rnd, clean_accuracy=clean, heads_knockout_accuracy=hko,
                    heads_random_accuracy=hrnd, n_random=n_random, ablation=ablation)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Attention of the chosen heads


def position_labels(dataset: Dataset, tokenizer=None) -> list[str]:
    """Names for the prompt positions.

    Digit style: `<bos> a2 a1 a0 op b2 b1 b0 = r0 ...` (index = the 10**i place; r = the teacher-forced
    answer digits before the scored one). Otherwise the first prompt's tokens (ids if no `tokenizer`).
    """
    ex = dataset.examples[0]
    n = dataset.clean_tokens.shape[1]
    if dataset.style == "digits" and "a_digits" in ex.meta:
        w = len(ex.meta["a_digits"])
        labels = ["<bos>"] + [f"a{i}" for i in reversed(range(w))] + ["op"] + [f"b{i}" for i in reversed(range(w))]
        labels += ["="] + [f"r{i}" for i in range(n - len(labels) - 1)]
        if len(labels) == n:
            return labels
    ids = dataset.clean_tokens[0].tolist()
    toks = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else [str(i) for i in ids]
    return [f"{i}:{t}" for i, t in enumerate(toks)]


@torch.no_grad()
def head_attention(
    model, dataset: Dataset, heads: Iterable[Component | str], *, query_pos: int = -1
) -> Float[Tensor, "head batch key_pos"]:
    """Attention pattern of each head from position `query_pos` (default: the final one) on the clean prompts."""
    comps = [c for c in as_components(heads) if c.kind == "head"]
    if not comps:
        return torch.empty(0, len(dataset), dataset.clean_tokens.shape[1])
    _, cache = model.run_with_cache(dataset.clean_tokens)
    return torch.stack([cache[f"blocks.{c.layer}.attn.hook_pattern"][:, c.head, query_pos].float() for c in comps])


# ---------------------------------------------------------------------------------------------------------
# The whole job (what `arithinterp localize` runs)


@dataclass(frozen=True, kw_only=True)
class LocalizeConfig:
    """Options of a localization run; every field has a default that works on the built-in addition model."""

    method: str = "activation"  # a registered score method (SCORE_METHODS)
    metric: str = "logit_diff"  # read for scores and faithfulness
    select: Selection = field(default_factory=lambda: Selection.by_faithfulness(0.9))
    ablation: str = "mean"  # how components outside (faithfulness) or inside (knockout) the circuit are removed
    baseline: str = "ablated"  # faithfulness normalisation: all components ablated, or the corrupted run
    positions: str = "all"  # ablate at every position, or only the final one
    n_random: int = 100  # random same-size sets for the necessity test
    n_random_transfer: int = 20  # per circuit and dataset in the transfer table
    seed: int = 0  # random sets

    def __post_init__(self) -> None:
        check_choice("score method", self.method, tuple(SCORE_METHODS))
        check_choice("ablation", self.ablation, ABLATIONS)
        check_choice("baseline", self.baseline, BASELINES)
        check_choice("positions", self.positions, POSITIONS)
        if self.n_random < 1 or self.n_random_transfer < 1:
            raise ArithInterpError(f"n_random={self.n_random}: pass at least 1 random set (e.g. --n-random 100).")


@dataclass(kw_only=True)
class LocalizeReport:
    """`necessity_heads`: the circuit's heads alone knocked out vs random head sets (MLPs intact), when the
    circuit has both heads and MLPs - the head-level claim, which matched random sets of a circuit holding every
    MLP cannot test."""

    circuit: Circuit
    necessity: Necessity
    necessity_heads: Necessity | None
    transfer: Transfer | None


def run_localize(
    model,
    dataset: Dataset,
    config: LocalizeConfig,
    *,
    transfer_to: Mapping[str, Dataset] | None = None,
    source_name: str = "source",
    info: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> LocalizeReport:
    """Score, select, measure faithfulness and necessity, and (with `transfer_to`) transfer.

    The circuit's `info` gains `"necessity"` and `"transfer"` records, so circuit.json holds the whole result.
    """
    c = config
    scores = component_scores(model, dataset, method=c.method, metric=c.metric, ablation=c.ablation, progress=progress)
    circuit = localize(scores, select=c.select, model=model, dataset=dataset, ablation=c.ablation,
                       baseline=c.baseline, positions=c.positions, metric=c.metric, method=c.method, info=info,
                       progress=progress)  # fmt: skip
    nec = necessity(model, dataset, circuit, n_random=c.n_random, seed=c.seed, ablation=c.ablation, metric=c.metric,
                    positions=c.positions, progress=progress)  # fmt: skip
    circuit.info["necessity"] = nec.to_dict()
    nec_heads = None
    if circuit.heads and circuit.mlps:
        nec_heads = necessity(model, dataset, circuit.heads, n_random=c.n_random, seed=c.seed, ablation=c.ablation,
                              metric=c.metric, positions=c.positions, progress=progress)  # fmt: skip
        circuit.info["necessity_heads"] = nec_heads.to_dict()
    trans = None
    if transfer_to:
        datasets = {source_name: dataset, **transfer_to}
        trans = transfer(model, datasets, circuits={source_name: circuit}, method=c.method, select=c.select,
                         metric=c.metric, ablation=c.ablation, baseline=c.baseline, positions=c.positions,
                         n_random=c.n_random_transfer, seed=c.seed, progress=progress)  # fmt: skip
        circuit.info["transfer"] = trans.to_dict() | {
            "datasets": {n: {"n": len(ds), "style": ds.style, "task": ds.config.task,
                             "answer_token": ds.config.answer_token, "counterfactual": ds.config.counterfactual,
                             "operand_range": ds.config.operand_range, "digits": ds.config.digits,
                             "fingerprint": ds.fingerprint()} for n, ds in datasets.items()},
        }  # fmt: skip
    return LocalizeReport(circuit=circuit, necessity=nec, necessity_heads=nec_heads, transfer=trans)


_TRANSFER_KEYS = {"task": str, "style": str, "counterfactual": str, "digits": int, "range": None,
                  "answer_token": int, "seed": int, "n": int}  # fmt: skip


def parse_transfer_spec(spec: str) -> dict[str, Any]:
    """`"answer_token=1"`, `"range=0:499,counterfactual=random"` -> TaskConfig overrides.

    Keys: task, style, counterfactual, digits, range (LO:HI), answer_token (or answer-token), seed, n.
    """
    out: dict[str, Any] = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        key, sep, value = part.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not sep or key not in _TRANSFER_KEYS or not value:
            raise ArithInterpError(
                f"transfer spec {spec!r}: {part!r} is not KEY=VALUE with KEY one of "
                f"{', '.join(_TRANSFER_KEYS)}; e.g. --transfer answer_token=1 or --transfer range=0:499."
            )
        try:
            if key == "range":
                lo, hi = value.replace("-", ":").split(":")
                out["operand_range"] = (int(lo), int(hi))
            else:
                out[key] = _TRANSFER_KEYS[key](value)
        except ValueError as exc:
            raise ArithInterpError(f"transfer spec {spec!r}: cannot read {key}={value!r}; e.g. range=0:499.") from exc
    if not out:
        raise ArithInterpError(f"transfer spec {spec!r} is empty; pass e.g. --transfer answer_token=1.")
    return out
