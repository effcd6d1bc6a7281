"""Direct logit attribution, the logit lens and the residual stream decomposed into its parts.

The idea (Elhage et al. 2021; nostalgebraist 2020): the final residual stream of a transformer is a *sum* of
what every component wrote into it,

    x_final = embed + pos_embed + sum_L [ sum_h head(L, h) + attn_bias(L) + mlp(L) ],

and the logits are a linear read-out of x_final after the final layer norm. GPT-2's layer norm

    LN(x) = (x - mean(x)) / s * w + b,        s = sqrt(var(x) + eps)

is linear in x once the scale `s` is frozen at its value in the run (`ln_final.hook_scale`), and the centring
is linear too. So with `u` the unembedding column of a token, each part `c` contributes exactly

    DLA(c) = (c - mean(c)) / s . (w * u)        and the bias contributes  b . u,

and the contributions add up to the logit, with no remainder. That is what `direct_logit_attribution`
computes, per example, for the answer token, for the answer minus the counterfactual answer (the logit
difference), and for a chosen set of tokens (e.g. every number token; `arithinterp.fourier` reads that).
MLPs may be split further into neurons: neuron n of layer L contributes `post[n] * W_out[n]`.

DLA measures *direct* effects only (what a component writes straight to the logits), not effects through later
components; compare it with activation patching (`arithinterp.patching`) with `rank_agreement`.

The logit lens (`logit_lens`) reads the residual stream out after every attention layer and every MLP, with
the final layer norm recomputed on the partial sum, and reports the answer's rank and probability there.

Axis names: `component` (a part of the decomposition), `batch`, `pos`, `d_model`, `d_mlp`, `layer`,
`stage` (a point of the residual stream for the logit lens), `set` (a chosen token set).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp import _gpt2
from arithinterp._errors import ArithInterpError
from arithinterp.metrics import mean_ci, spearman
from arithinterp.tasks import Dataset

if TYPE_CHECKING:
    from arithinterp.fourier import FourierFilter

# ---------------------------------------------------------------------------------------------------------
# Residual decomposition


@dataclass(frozen=True, kw_only=True)
class Part:
    """One additive part of the final residual: `embed`, `pos_embed`, a head `L{l}H{h}`, an attention
    output bias `attn_bias{l}`, an MLP `MLP{l}` (output including its bias), or `ln_final.b` (the final
    layer norm's bias; it is not in the residual but adds a constant to every logit)."""

    name: str
    kind: str  # embed | pos_embed | head | attn_bias | mlp | ln_bias
    layer: int | None = None
    head: int | None = None

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "head": self.head}


def residual_parts(n_layers: int, n_heads: int) -> list[Part]:
    """The parts of the final residual, in the order of `Decomposition.stack` (ln_final.b not included)."""
    parts = [Part(name="embed", kind="embed"), Part(name="pos_embed", kind="pos_embed")]
    for layer in range(n_layers):
        parts += [Part(name=f"L{layer}H{h}", kind="head", layer=layer, head=h) for h in range(n_heads)]
        parts.append(Part(name=f"attn_bias{layer}", kind="attn_bias", layer=layer))
        parts.append(Part(name=f"MLP{layer}", kind="mlp", layer=layer))
    return parts


@dataclass(kw_only=True)
class Decomposition:
    """The final residual at one position, split into `parts`, with what is needed to read it out.

    `stack.sum(0) == final` (up to float error). `scale` is the final layer norm's cached scale of the run,
    `stages` the residual stream after the embedding, after each attention layer and after each MLP (the
    logit-lens read-out points, labelled by `stage_names`); `logits` the model's own output there;
    `mlp_post` the MLP neuron activations `[layer, batch, d_mlp]` (only when asked for).
    """

    parts: list[Part]
    stack: Float[Tensor, "component batch d_model"]
    final: Float[Tensor, "batch d_model"]
    scale: Float[Tensor, " batch"]
    logits: Float[Tensor, "batch d_vocab"]
    stages: Float[Tensor, "stage batch d_model"]
    stage_names: list[str]
    mlp_post: Float[Tensor, "layer batch d_mlp"] | None = None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]


def gpt2_weights(
    model, weights: _gpt2.GPT2Weights | None = None, *, what: str = "direct logit attribution"
) -> _gpt2.GPT2Weights:
    """`weights` when the caller already holds them, else the model's weights read afresh (a full copy: about
    340 MB for GPT-2 small, so an analysis reads them once and passes them down).

    Every attribution and Fourier path comes here rather than to `_gpt2.extract_weights`, so that a model of
    another architecture is refused with a message about `what` was asked, not about the patching engine.
    """
    if weights is not None:
        return weights
    if not _gpt2.supports(model):
        raise ArithInterpError(
            f"{what} is implemented for GPT-2-architecture models; "
            f"{type(_gpt2.hf_model(model)).__name__} is not one - pass a GPT-2 model."
        )
    return _gpt2.extract_weights(model)


def _hook_names(n_layers: int, neurons: bool) -> set[str]:
    names = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_in"}
    for layer in range(n_layers):
        names |= {f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_resid_mid",
                  f"blocks.{layer}.hook_resid_post"}  # fmt: skip
        if neurons:
            names.add(f"blocks.{layer}.mlp.hook_post")
    return names


@torch.no_grad()
def decompose_residual(
    model,
    tokens: Int[Tensor, "batch pos"],
    *,
    pos: int = -1,
    neurons: bool = False,
    batch_size: int = 64,
    progress: bool = False,
    weights: _gpt2.GPT2Weights | None = None,
) -> Decomposition:
    """Run `model` on `tokens` (transformer-lens hooks) and split the residual at position `pos` into parts.

    Heads are `z[pos, h] @ W_O[h]` from `blocks.L.attn.hook_z`; the attention output bias is its own part;
    MLPs are `blocks.L.hook_mlp_out`. The scale is `ln_final.hook_scale` of the same run. Pass the model's
    `weights` (`gpt2_weights`) when you already hold them.
    """
    return decompose_positions(model, tokens, [pos], neurons=neurons, batch_size=batch_size, progress=progress,
                               weights=weights)[0]  # fmt: skip


@torch.no_grad()
def decompose_positions(
    model,
    tokens: Int[Tensor, "batch pos"],
    positions: list[int],
    *,
    neurons: bool = False,
    batch_size: int = 64,
    progress: bool = False,
    weights: _gpt2.GPT2Weights | None = None,
) -> list[Decomposition]:
    """`decompose_residual` at several positions from one run (e.g. every answer digit of a teacher-forced
    answer)."""
    w = gpt2_weights(model, weights)
    n_layers = w.n_layers
    wanted = _hook_names(n_layers, neurons)
    idx = torch.tensor(positions)
    chunks: list[dict[str, Tensor]] = []
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="caching", disable=not progress):
        logits, cache = model.run_with_cache(tokens[start : start + batch_size], names_filter=lambda n: n in wanted)
        chunks.append({k: cache[k][:, idx].detach().float() for k in wanted} | {"logits": logits[:, idx].float()})
    every = {k: torch.cat([c[k] for c in chunks]) for k in wanted | {"logits"}}  # (batch, position, ...)
    return [_decomposition(w, {k: v[:, i] for k, v in every.items()}, neurons) for i in range(len(positions))]


def _decomposition(w: _gpt2.GPT2Weights, act: dict[str, Tensor], neurons: bool) -> Decomposition:
    """Assemble the parts from one position's activations (`act[hook]` is `[batch, ...]`)."""
    n_layers, n_heads = w.n_layers, w.n_heads
    batch = act["hook_embed"].shape[0]
    rows = [act["hook_embed"], act["hook_pos_embed"]]
    for layer in range(n_layers):
        z = act[f"blocks.{layer}.attn.hook_z"]  # (batch, head, d_head)
        rows += list(torch.einsum("bhd,hdm->hbm", z, w.W_O[layer]))
        rows.append(w.b_O[layer].expand(batch, -1))
        rows.append(act[f"blocks.{layer}.hook_mlp_out"])
    stages, stage_names = [act["hook_embed"] + act["hook_pos_embed"]], ["embed"]
    for layer in range(n_layers):
        stages += [act[f"blocks.{layer}.hook_resid_mid"], act[f"blocks.{layer}.hook_resid_post"]]
        stage_names += [f"attn{layer}", f"mlp{layer}"]
    post = torch.stack([act[f"blocks.{layer}.mlp.hook_post"] for layer in range(n_layers)]) if neurons else None
    return Decomposition(
        parts=residual_parts(n_layers, n_heads), stack=torch.stack(rows), final=act["ln_final.hook_in"],
        scale=act["ln_final.hook_scale"][..., 0], logits=act["logits"], stages=torch.stack(stages),
        stage_names=stage_names, mlp_post=post,
    )  # fmt: skip


def effective_unembed(w: _gpt2.GPT2Weights, columns: Tensor | None = None) -> Float[Tensor, "d_model columns"]:
    """`C diag(w_lnf) W_U[:, columns]`: the read-out of a residual vector once the LN scale is divided out.

    `C` centres (subtracts the mean over d_model); since C is symmetric, `(x - mean(x)) . (w*u) = x . C(w*u)`,
    so `x @ effective_unembed / s` is the exact contribution of x to those logits.
    """
    wu = w.lnf_w[:, None] * (w.W_U if columns is None else w.W_U[:, columns])
    return wu - wu.mean(0, keepdim=True)


def part_contributions(
    decomposition: Decomposition, w: _gpt2.GPT2Weights, columns: Tensor
) -> Float[Tensor, "component batch columns"]:
    """Every part's contribution to the logits of `columns` (the last part is ln_final.b); sums to the logits."""
    eff = effective_unembed(w, columns)
    contrib = torch.einsum("cbm,mk->cbk", decomposition.stack, eff) / decomposition.scale[None, :, None]
    bias = (w.lnf_b @ w.W_U[:, columns]).expand(1, contrib.shape[1], -1)
    return torch.cat([contrib, bias])


# ---------------------------------------------------------------------------------------------------------
# Direct logit attribution


@dataclass(kw_only=True)
class NeuronDLA:
    """Contributions of single MLP neurons, `[layer, batch, d_mlp]`, to the answer logit and logit difference."""

    answer_logit: Float[Tensor, "layer batch d_mlp"]
    logit_diff: Float[Tensor, "layer batch d_mlp"] | None

    def top(self, k: int = 20, metric: str = "logit_diff") -> list[dict[str, Any]]:
        """The `k` neurons with the largest mean |contribution|, as records `{name: "L0N17", mean, ...}`."""
        values = self.logit_diff if metric == "logit_diff" and self.logit_diff is not None else self.answer_logit
        mean = values.mean(1)  # (layer, d_mlp)
        flat = mean.abs().flatten().topk(min(k, mean.numel())).indices
        d_mlp = mean.shape[1]
        recs = []
        for i in flat.tolist():
            layer, n = divmod(i, d_mlp)
            recs.append({"name": f"L{layer}N{n}", "layer": layer, "neuron": n, "mean": float(mean[layer, n])})
        return recs


@dataclass(kw_only=True)
class DLAResult:
    """Per-example direct logit attributions of every part (`parts`, the last one `ln_final.b`).

    `answer_logit[c, i]`: part c's contribution to example i's answer logit; summed over parts it equals the
    model's answer logit (`answer_logit_total`). `logit_diff` likewise for answer minus counterfactual
    answer (None when the counterfactual has no answer), `token_set` for each token of `token_set_ids`.
    """

    parts: list[Part]
    answer_logit: Float[Tensor, "component batch"]
    answer_logit_total: Float[Tensor, " batch"]
    logit_diff: Float[Tensor, "component batch"] | None
    logit_diff_total: Float[Tensor, " batch"] | None
    token_set: Float[Tensor, "component batch set"] | None = None
    token_set_ids: Int[Tensor, " set"] | None = None
    neurons: NeuronDLA | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    def values(self, metric: str = "logit_diff") -> Float[Tensor, "component batch"]:
        if metric == "logit_diff":
            if self.logit_diff is None:
                raise ArithInterpError("this dataset has no counterfactual answer; use metric='answer_logit'.")
            return self.logit_diff
        if metric == "answer_logit":
            return self.answer_logit
        raise ArithInterpError(f"unknown DLA metric {metric!r}; choose logit_diff or answer_logit.")

    def max_sum_error(self) -> dict[str, float]:
        """Largest |sum of parts - model value| over examples: the check that the attribution is exact."""
        out = {"answer_logit": float((self.answer_logit.sum(0) - self.answer_logit_total).abs().max())}
        if self.logit_diff is not None:
            out["logit_diff"] = float((self.logit_diff.sum(0) - self.logit_diff_total).abs().max())
        return out

    def ranked(self, metric: str = "logit_diff", *, level: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
        """Part records with mean, bootstrap CI and the other metric's mean, sorted by |mean|, largest first."""
        v = self.values(metric)
        mean, lo, hi = mean_ci(v, level=level, seed=seed)
        other = self.answer_logit if metric == "logit_diff" else self.logit_diff
        recs = []
        for i, p in enumerate(self.parts):
            r = p.record() | {"mean": float(mean[i]), "ci": [float(lo[i]), float(hi[i])]}
            if other is not None:
                r["answer_logit_mean" if metric == "logit_diff" else "logit_diff_mean"] = float(other[i].mean())
            recs.append(r)
        return sorted(recs, key=lambda r: -abs(r["mean"]))

    def grouped(self, metric: str = "logit_diff", *, level: float = 0.95, seed: int = 0) -> list[dict[str, Any]]:
        """Sums by layer: embed (token + position), ATTN{l} (heads + bias), MLP{l}, ln_final.b; with CIs.

        This is the residual stream decomposed at the resolution of layers; the rows add up to the total.
        """
        v = self.values(metric)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(self.parts):
            key = {"embed": "embed", "pos_embed": "embed", "head": f"ATTN{p.layer}", "attn_bias": f"ATTN{p.layer}",
                   "mlp": f"MLP{p.layer}", "ln_bias": "ln_final.b"}[p.kind]  # fmt: skip
            groups.setdefault(key, []).append(i)
        stacked = torch.stack([v[idx].sum(0) for idx in groups.values()])
        mean, lo, hi = mean_ci(stacked, level=level, seed=seed)
        return [{"name": k, "mean": float(m), "ci": [float(a), float(b)]} for k, m, a, b in zip(groups, mean, lo, hi)]

    def head_grid(self, n_layers: int, n_heads: int, metric: str = "logit_diff") -> Float[Tensor, "layer head"]:
        grid = torch.full((n_layers, n_heads), float("nan"))
        v = self.values(metric).mean(1)
        for i, p in enumerate(self.parts):
            if p.kind == "head":
                grid[p.layer, p.head] = v[i]
        return grid

    def component_means(self, metric: str = "logit_diff") -> dict[str, float]:
        """Mean contribution of each head and MLP, keyed by the patching names (`L0H1`, `MLP2`)."""
        v = self.values(metric).mean(1)
        return {p.name: float(v[i]) for i, p in enumerate(self.parts) if p.kind in ("head", "mlp")}


@torch.no_grad()
def direct_logit_attribution(
    model,
    dataset: Dataset,
    *,
    token_set: Int[Tensor, " set"] | None = None,
    neurons: bool = False,
    decomposition: Decomposition | None = None,
    batch_size: int = 64,
    progress: bool = False,
    weights: _gpt2.GPT2Weights | None = None,
) -> DLAResult:
    """DLA of every part of the final-position residual on the clean prompts of `dataset`.

    Returns contributions to the answer logit, to the logit difference (answer - counterfactual answer,
    when the dataset has one), and optionally to each token of `token_set`; with `neurons=True` also per MLP
    neuron. Pass a `decomposition` of `dataset.clean_tokens` to reuse one run, and the model's `weights`
    (`gpt2_weights`) to reuse one copy of them.
    """
    w = gpt2_weights(model, weights)
    d = decomposition or decompose_residual(model, dataset.clean_tokens, neurons=neurons, batch_size=batch_size,
                                            progress=progress, weights=w)  # fmt: skip
    if neurons and d.mlp_post is None:
        raise ArithInterpError("neurons=True needs a decomposition made with neurons=True.")
    batch = torch.arange(len(dataset))
    has_cf = dataset.has_counterfactual_answer
    ids = torch.cat([dataset.answer_ids, dataset.counterfactual_ids]) if has_cf else dataset.answer_ids
    cols, inv = torch.unique(ids, return_inverse=True)
    a, c = inv[: len(dataset)], inv[len(dataset) :]
    contrib = part_contributions(d, w, cols)  # (component, batch, cols)
    logits = d.logits[:, cols]  # (batch, cols): the model's own output
    answer = contrib[:, batch, a]
    diff = contrib[:, batch, a] - contrib[:, batch, c] if has_cf else None
    result = DLAResult(
        parts=d.parts + [Part(name="ln_final.b", kind="ln_bias")], answer_logit=answer,
        answer_logit_total=logits[batch, a], logit_diff=diff,
        logit_diff_total=logits[batch, a] - logits[batch, c] if has_cf else None,
        info={"position": "final", "ln_final": "cached scale, centred"},
    )  # fmt: skip
    if token_set is not None:
        result.token_set = part_contributions(d, w, token_set)
        result.token_set_ids = token_set
    if neurons:
        eff = effective_unembed(w, cols)  # (d_model, cols)
        per = torch.einsum("lnm,mk->lnk", w.W_out, eff)  # (layer, d_mlp, cols): neuron direction read-out
        post = d.mlp_post / d.scale[None, :, None]  # (layer, batch, d_mlp)
        n_answer = post * per[:, :, a].transpose(1, 2)
        n_diff = post * (per[:, :, a] - per[:, :, c]).transpose(1, 2) if has_cf else None
        result.neurons = NeuronDLA(answer_logit=n_answer, logit_diff=n_diff)
    return result


# ---------------------------------------------------------------------------------------------------------
# Logit lens


@dataclass(kw_only=True)
class LogitLens:
    """The answer read out of the residual stream at each stage (embed, after attn L, after MLP L).

    The final layer norm is recomputed on each partial residual (its own mean and scale), the standard logit
    lens; the last stage is the model's own output. `rank` is 0 when the answer is the top token.
    """

    stage_names: list[str]
    rank: Int[Tensor, "stage batch"]
    prob: Float[Tensor, "stage batch"]
    logit_diff: Float[Tensor, "stage batch"] | None

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for s, name in enumerate(self.stage_names):
            r = self.rank[s].float()
            rec = {"stage": name, "top1": float((r == 0).float().mean()), "mean_rank": float(r.mean()),
                   "median_rank": float(r.median()), "mean_prob": float(self.prob[s].mean())}  # fmt: skip
            if self.logit_diff is not None:
                rec["mean_logit_diff"] = float(self.logit_diff[s].mean())
            out.append(rec)
        return out


@torch.no_grad()
def logit_lens(
    model, dataset: Dataset, *, decomposition: Decomposition | None = None, weights: _gpt2.GPT2Weights | None = None
) -> LogitLens:
    """The answer's rank and probability (and the logit difference) after every attention layer and MLP."""
    w = gpt2_weights(model, weights)
    d = decomposition or decompose_residual(model, dataset.clean_tokens, weights=w)
    batch = torch.arange(len(dataset))
    has_cf = dataset.has_counterfactual_answer
    rank, prob, diff = [], [], []
    for stage in d.stages:  # one stage at a time: [batch, d_vocab] logits stay small for GPT-2's vocabulary
        logits = _gpt2.layer_norm(stage, w.lnf_w, w.lnf_b, w.eps) @ w.W_U  # (batch, d_vocab)
        ans = logits[batch, dataset.answer_ids]
        rank.append((logits > ans[:, None]).sum(-1))
        prob.append(logits.softmax(-1)[batch, dataset.answer_ids])
        if has_cf:
            diff.append(ans - logits[batch, dataset.counterfactual_ids])
    return LogitLens(stage_names=d.stage_names, rank=torch.stack(rank), prob=torch.stack(prob),
                     logit_diff=torch.stack(diff) if has_cf else None)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Agreement with activation patching


def rank_agreement(dla: DLAResult, patch, metric: str = "logit_diff") -> dict[str, Any]:
    """Spearman correlation between mean DLA and activation-patching scores over the heads and MLPs.

    `signed` compares the signed values; `absolute` compares magnitudes (which components matter at all).
    `top` lists the components in both rankings.
    """
    means = dla.component_means(metric)
    names = [c.name for c in patch.components if c.name in means]
    if len(names) < 3:
        raise ArithInterpError("rank agreement needs at least 3 components present in both results.")
    x = torch.tensor([means[n] for n in names])
    score = dict(zip([c.name for c in patch.components], patch.scores.tolist()))
    y = torch.tensor([score[n] for n in names])
    return {
        "n_components": len(names), "signed": spearman(x, y), "absolute": spearman(x.abs(), y.abs()),
        "dla_top": [names[i] for i in x.abs().argsort(descending=True)[:5].tolist()],
        "patching_top": [names[i] for i in y.abs().argsort(descending=True)[:5].tolist()],
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# One call for the CLI


@dataclass(frozen=True, kw_only=True)
class AttributeConfig:
    """What `attribute` computes beyond DLA and the logit lens (which it always does)."""

    fourier: bool = False  # spectra of components, final logits (per answer digit) and number embeddings
    filters: tuple[str, ...] = ()  # Fourier filter specs ("attn:high", "mlp1:low", ...) to evaluate
    neurons: bool = False  # also attribute to single MLP neurons
    top_neurons: int = 20  # how many neurons the record lists
    compare_patching: bool = False  # run activation patching and report the rank agreement
    max_numbers: int | None = None  # cap on the number axis (GPT-2: 0..361 by default)
    parsed_filters: tuple[FourierFilter, ...] = field(init=False, repr=False, compare=False)  # `filters`, parsed once

    def __post_init__(self) -> None:
        from arithinterp.fourier import FourierFilter

        # parsing raises a one-line error naming the bad spec
        object.__setattr__(self, "parsed_filters", tuple(FourierFilter.parse(spec) for spec in self.filters))
        if self.top_neurons < 1:
            raise ArithInterpError(f"top_neurons={self.top_neurons} must be >= 1.")


@dataclass(kw_only=True)
class AttributionReport:
    """Everything `attribute` found; `record()` is the body of attribute.json."""

    metric: str
    dla: DLAResult
    lens: LogitLens
    spectra: Any = None  # fourier.ComponentSpectra
    embedding: dict[str, Any] | None = None  # fourier.Spectrum of W_E and W_U rows
    coherence: dict[str, Any] | None = None  # phase-locking of each site's waves to the answer
    answer_digits: list[dict[str, Any]] | None = None
    filters: list[Any] = field(default_factory=list)  # fourier.FilterResult
    agreement: dict[str, Any] | None = None
    top_neurons: int = 20

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dla_metric": self.metric,
            "baseline": {"answer_logit": float(self.dla.answer_logit_total.mean())}
            | ({"logit_diff": float(self.dla.logit_diff_total.mean())} if self.dla.logit_diff_total is not None
               else {}),
            "sum_check": self.dla.max_sum_error(),
            "components": self.dla.ranked(self.metric),
            "layers": self.dla.grouped(self.metric),
            "logit_lens": self.lens.summary(),
        }  # fmt: skip
        if self.dla.neurons is not None:
            out["neurons"] = self.dla.neurons.top(self.top_neurons, self.metric)
        if self.agreement is not None:
            out["patching_agreement"] = self.agreement
        if self.spectra is not None:
            out["fourier"] = {
                "numbers": self.spectra.numbers.record(),
                "components": self.spectra.record(),
                "answer_digits": self.answer_digits,
                "embedding": {k: v.record() for k, v in (self.embedding or {}).items()},
                "answer_coherence": self.coherence,
            }
        if self.filters:
            out["filters"] = [f.record() for f in self.filters]
        return out


@contextmanager
def _pinned_weights(model, w: _gpt2.GPT2Weights):
    """Let the patching engine use `w` instead of reading its own copy (`patching.weights` looks for weights a
    caller pinned on the model); a pin the caller made stays theirs."""
    if getattr(model, "_arithinterp_w", None) is not None:
        yield
        return
    model._arithinterp_w = w
    try:
        yield
    finally:
        del model._arithinterp_w


def attribute(model, dataset: Dataset, config: AttributeConfig | None = None, *, progress: bool = True):
    """DLA (answer logit and logit difference), logit lens and, as configured, Fourier spectra, Fourier
    filters and the agreement with activation patching, on `dataset`'s clean prompts.

    The model's weights are read once and shared by every analysis; every filter is checked against the
    model (its layers) and the number axis (its band) before the first forward pass.
    """
    from arithinterp import fourier

    config = config or AttributeConfig()
    filters = config.parsed_filters
    for f in filters:  # fail before any work
        f.layers_in(model.cfg.n_layers)
    w = gpt2_weights(model)
    numbers = None
    if config.fourier or filters:
        numbers = fourier.number_tokens(model.tokenizer, max_n=config.max_numbers)
    for f in filters:
        f.frequencies(numbers)  # a band that does not fit the number axis
    d = decompose_residual(model, dataset.clean_tokens, neurons=config.neurons, progress=progress, weights=w)
    dla = direct_logit_attribution(model, dataset, neurons=config.neurons, decomposition=d, weights=w)
    metric = "logit_diff" if dla.logit_diff is not None else "answer_logit"
    report = AttributionReport(metric=metric, dla=dla, lens=logit_lens(model, dataset, decomposition=d, weights=w),
                               top_neurons=config.top_neurons)  # fmt: skip
    if config.fourier:
        report.spectra = fourier.spectra_of_decomposition(model, d, numbers=numbers, weights=w)
        report.embedding = fourier.embedding_spectrum(model, numbers=numbers, weights=w)
        answer = numbers.index_of(dataset.answer_ids)
        if (answer >= 0).any():
            sites = [n for n in report.spectra.names if not n.startswith("L") and not n.startswith("attn_bias")]
            report.coherence = report.spectra.coherence_record(answer, sites)
        if dataset.token_set is None:
            report.answer_digits = fourier.answer_digit_spectra(model, dataset, numbers=numbers)
    if filters:
        report.filters = fourier.evaluate_filters(model, dataset, list(filters), numbers=numbers, progress=progress,
                                                  weights=w)  # fmt: skip
    if config.compare_patching:
        from arithinterp.patching import patch_components

        with _pinned_weights(model, w):
            patch = patch_components(model, dataset, metric=metric, progress=progress)
        report.agreement = rank_agreement(dla, patch, metric)
    return report
