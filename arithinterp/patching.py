"""Activation patching at every granularity, in both directions, with an exact fast engine.

The idea (Meng et al. 2022; Wang et al. 2022): run the model on one prompt (the *base* run), put back one
activation from a run on the other prompt (the *source* run), and measure how far the output moves. A site
whose activation moves the answer carries information the task needs. Two directions:

* **denoising** (the default): base = corrupted prompt, source = clean prompt. A site that restores the clean
  answer on its own is *sufficient* for the difference.
* **noising**: base = clean prompt, source = corrupted prompt. A site whose corrupted value destroys the
  answer is *necessary*.

Scores are normalised the same way in both directions (`arithinterp.metrics`): 0 = the corrupted run's
metric, 1 = the clean run's. In denoising look for scores far above 0; in noising for scores far below 1.

A `Site` is one activation to patch: a residual stream vector (`resid_pre`, `resid_mid`, `resid_post`), a
layer's attention or MLP output (`attn_out`, `mlp_out`), or one head's output `z`, query `q`, key `k`, value
`v` or attention `pattern`; at one position, or at all positions at once (`pos=None`). `Component` (a head or
an MLP, the unit the rest of arithinterp speaks of) is the familiar special case: its output at the final
position. `sites_for(granularity, position)` builds the sweeps a researcher runs.

Two engines give the same numbers (the tests check it to 1e-4 on the normalised metric):

* `"fast"` (GPT-2 architecture): runs clean and corrupted once, then for each layer evaluates many patches
  in one batched pass stacked on a leading `patch` axis, starting from the cached residual stream at that
  layer and recomputing only positions >= the patched one (earlier keys and values come from the cache),
  unembedding only the final position and only the vocabulary columns the metric reads - see
  `arithinterp._gpt2`. Every patch is expressed as an exact change of the residual stream at one stage
  (pre/mid/post) of its layer; query, key, value and pattern patches first recompute their head.
* `"transformer-lens"`: `transformer_lens.patching.generic_activation_patch` on the bridge, one full forward
  pass per patch; works for any architecture the bridge loads.

`engine="auto"` picks the fast one when the model qualifies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Literal, get_args

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp import _gpt2
from arithinterp._errors import ArithInterpError
from arithinterp.metrics import bootstrap_ci, make_metric, normalise
from arithinterp.tasks import Dataset

Engine = Literal["auto", "fast", "transformer-lens"]
Direction = Literal["denoising", "noising"]
Granularity = Literal[
    "components", "heads", "head_q", "head_k", "head_v", "head_pattern",
    "attn_out", "mlp_out", "resid_pre", "resid_mid", "resid_post",
]  # fmt: skip
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
PATCH_METHODS = ("activation", "path", "attribution", "eap-ig")  # `arithinterp patch --method`
CLI_GRANULARITIES = (*GRANULARITIES, "edge")  # `--granularity`: edge is for attribution methods
ACTIVATIONS = ("z", "q", "k", "v", "pattern", "attn_out", "mlp_out", "resid_pre", "resid_mid", "resid_post")
HEAD_ACTIVATIONS = ("z", "q", "k", "v", "pattern")
# The residual stage of a site's layer at which its patch enters the stream (the fast engine resumes there).
_STAGE = {"resid_pre": "pre", "resid_post": "post", "mlp_out": "post"}
_GRANULARITY_ACTIVATION = {
    "heads": "z", "head_q": "q", "head_k": "k", "head_v": "v", "head_pattern": "pattern", "attn_out": "attn_out",
    "mlp_out": "mlp_out", "resid_pre": "resid_pre", "resid_mid": "resid_mid", "resid_post": "resid_post",
}  # fmt: skip
# Elements of the residual-stream tensor one batched pass may hold (`patch * batch * suffix * d_model`).
_PASS_BUDGET = 2**23


@dataclass(frozen=True, kw_only=True)
class Component:
    """A head (`L{layer}H{head}`) or an MLP (`MLP{layer}`)."""

    kind: Literal["head", "mlp"]
    layer: int
    head: int | None = None

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}" if self.kind == "head" else f"MLP{self.layer}"

    @classmethod
    def parse(cls, name: str) -> "Component":
        m = re.fullmatch(r"L(\d+)H(\d+)", name) or re.fullmatch(r"MLP(\d+)", name)
        if m is None:
            raise ArithInterpError(f"component {name!r} is not a head 'L<layer>H<head>' or an MLP 'MLP<layer>'.")
        return (
            cls(kind="head", layer=int(m[1]), head=int(m[2]))
            if name.startswith("L")
            else cls(kind="mlp", layer=int(m[1]))
        )

    def record(self) -> dict[str, Any]:
        """The JSON fields that identify this component."""
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "head": self.head}


@dataclass(frozen=True, kw_only=True)
class Site:
    """One activation to patch: `activation` of `layer` (and `head`), at position `pos` or at all (`None`).

    Names: `L3H1@7` (head output z), `L3H1.q@7` (query; also `.k`, `.v`, `.pattern` where the position is the
    query/destination position), `ATTN3@7` (attention output), `MLP3@7`, `L3.resid_pre@7`; `@all` for all
    positions.
    """

    activation: str
    layer: int
    head: int | None = None
    pos: int | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ArithInterpError(f"unknown activation {self.activation!r}; choose one of: {', '.join(ACTIVATIONS)}.")
        if (self.head is not None) != (self.activation in HEAD_ACTIVATIONS):
            raise ArithInterpError(f"site {self.activation} of layer {self.layer}: pass a head exactly for "
                                   f"per-head activations ({', '.join(HEAD_ACTIVATIONS)}).")  # fmt: skip

    @property
    def kind(self) -> str:
        if self.activation in HEAD_ACTIVATIONS:
            return "head"
        return {"attn_out": "attn", "mlp_out": "mlp"}.get(self.activation, "resid")

    @property
    def name(self) -> str:
        a, layer = self.activation, self.layer
        if a in HEAD_ACTIVATIONS:
            base = f"L{layer}H{self.head}" + ("" if a == "z" else f".{a}")
        else:
            base = {"attn_out": f"ATTN{layer}", "mlp_out": f"MLP{layer}"}.get(a, f"L{layer}.{a}")
        return f"{base}@{'all' if self.pos is None else self.pos}"

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "head": self.head,
                "activation": self.activation, "pos": "all" if self.pos is None else self.pos}  # fmt: skip


def all_components(n_layers: int, n_heads: int) -> list[Component]:
    """Every head and MLP, layer by layer (heads first within a layer)."""
    out = []
    for layer in range(n_layers):
        out += [Component(kind="head", layer=layer, head=h) for h in range(n_heads)]
        out.append(Component(kind="mlp", layer=layer))
    return out


def parse_position(position: str | int, n_pos: int) -> list[int | None]:
    """Positions a sweep covers: "final", "each" (every position), "all" (one patch of all positions) or an
    index (negative counts from the end)."""
    if isinstance(position, str) and re.fullmatch(r"-?\d+", position):
        position = int(position)
    if position == "final":
        return [n_pos - 1]
    if position == "each":
        return list(range(n_pos))
    if position == "all":
        return [None]
    if isinstance(position, int) and -n_pos <= position < n_pos:
        return [position % n_pos]
    raise ArithInterpError(f"position {position!r} is not final, each, all or an index in "
                           f"-{n_pos}..{n_pos - 1} (the prompts have {n_pos} tokens).")  # fmt: skip


def sites_for(
    granularity: str, *, n_layers: int, n_heads: int, n_pos: int, position: str | int = "final"
) -> list[Component | Site]:
    """The sites of a sweep. `components` at the final position gives `Component`s (heads and MLPs)."""
    if granularity not in GRANULARITIES:
        raise ArithInterpError(f"unknown granularity {granularity!r}; choose one of: {', '.join(GRANULARITIES)}.")
    positions = parse_position(position, n_pos)
    if granularity == "components":
        if positions == [n_pos - 1]:
            return all_components(n_layers, n_heads)
        out: list[Component | Site] = []
        for layer in range(n_layers):
            for p in positions:
                out += [Site(activation="z", layer=layer, head=h, pos=p) for h in range(n_heads)]
                out.append(Site(activation="mlp_out", layer=layer, pos=p))
        return out
    act = _GRANULARITY_ACTIVATION[granularity]
    heads: list[int | None] = list(range(n_heads)) if act in HEAD_ACTIVATIONS else [None]
    return [Site(activation=act, layer=layer, head=h, pos=p) for layer in range(n_layers) for h in heads
            for p in positions]  # fmt: skip


@dataclass(kw_only=True)
class PatchResult:
    """Per-site scores with their per-example metric values.

    `patched[c, i]` is the metric on example i with site c patched (for attribution methods: the first-order
    estimate of it); `clean` and `corrupted` are the unpatched runs. `scores` are normalised (0 = corrupted,
    1 = clean) with bootstrap intervals. `components` holds `Component`s, `Site`s or path-patching `Edge`s;
    each has `.name` and `.record()`.
    """

    components: list[Any]
    metric: str
    patched: Float[Tensor, "component batch"]
    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]
    scores: Float[Tensor, " component"] = field(init=False)
    ci_low: Float[Tensor, " component"] = field(init=False)
    ci_high: Float[Tensor, " component"] = field(init=False)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = normalise(self.patched, self.clean, self.corrupted)
        self.ci_low, self.ci_high = bootstrap_ci(self.patched, self.clean, self.corrupted)

    @property
    def effects(self) -> Float[Tensor, " component"]:
        """Scores measured from the base run: `score` when denoising, `score - 1` when noising."""
        return self.scores - (1.0 if self.info.get("direction") == "noising" else 0.0)

    def score_of(self, name: str) -> float:
        for c, s in zip(self.components, self.scores):
            if c.name == name:
                return float(s)
        raise KeyError(name)

    def ranked(self) -> list[dict[str, Any]]:
        """Records sorted by absolute effect (absolute score when denoising), largest first (the JSON contract)."""
        recs = [
            {**c.record(), "score": float(s), "ci": [float(lo), float(hi)]}
            for c, s, lo, hi in zip(self.components, self.scores, self.ci_low, self.ci_high)
        ]
        order = sorted(range(len(recs)), key=lambda i: -abs(float(self.effects[i])))
        return [recs[i] for i in order]

    def head_grid(self, n_layers: int, n_heads: int) -> Tensor:
        """Scores as a `[layer, head]` grid (NaN where a head was not patched)."""
        grid = torch.full((n_layers, n_heads), float("nan"))
        for c, s in zip(self.components, self.scores):
            if c.kind == "head":
                grid[c.layer, c.head] = s
        return grid

    def mlp_row(self, n_layers: int) -> Tensor:
        row = torch.full((n_layers,), float("nan"))
        for c, s in zip(self.components, self.scores):
            if c.kind == "mlp":
                row[c.layer] = s
        return row


def model_dims(model) -> tuple[int, int]:
    return int(model.cfg.n_layers), int(model.cfg.n_heads)


def _check_components(components: list, n_layers: int, n_heads: int, n_pos: int | None = None) -> None:
    for c in components:
        if not 0 <= c.layer < n_layers:
            raise ArithInterpError(
                f"{c.name}: layer {c.layer} is out of range; the model has layers 0..{n_layers - 1}."
            )
        if c.kind == "head" and not 0 <= c.head < n_heads:
            raise ArithInterpError(f"{c.name}: head {c.head} is out of range; the model has heads 0..{n_heads - 1}.")
        pos = getattr(c, "pos", None)
        if n_pos is not None and pos is not None and not 0 <= pos < n_pos:
            raise ArithInterpError(f"{c.name}: position {pos} is out of range; the prompts have {n_pos} tokens.")


def _check_common(dataset: Dataset, direction: str, engine: str, model) -> str:
    if len(dataset) == 0:
        raise ArithInterpError("the dataset is empty; pass n >= 1.")
    if direction not in DIRECTIONS:
        raise ArithInterpError(f"unknown direction {direction!r}; choose denoising or noising.")
    if engine == "auto":
        return "fast" if _gpt2.supports(model) else "transformer-lens"
    if engine not in ("fast", "transformer-lens"):
        raise ArithInterpError(f"unknown engine {engine!r}; choose auto, fast or transformer-lens.")
    return engine


def run_in_batches(dataset: Dataset, batch_size: int, run: Callable[[Dataset, bool], tuple], progress: bool):
    """Run `run(part, show_progress)` on consecutive slices of `dataset`; concatenate its (clean, corrupted,
    patched) outputs along the example axis."""
    if batch_size < 1:
        raise ArithInterpError(f"batch_size={batch_size} must be >= 1.")
    chunks = []
    for start in range(0, len(dataset), batch_size):
        part = dataset.subset(list(range(start, min(start + batch_size, len(dataset)))))
        chunks.append(run(part, progress and start == 0))
    return tuple(torch.cat([c[i] for c in chunks], dim=-1) for i in range(3))


def activation_patch(
    model,
    dataset: Dataset,
    *,
    granularity: str = "components",
    position: str | int = "final",
    sites: list[Component | Site] | None = None,
    direction: Direction = "denoising",
    metric: str = "logit_diff",
    engine: Engine = "auto",
    batch_size: int = 64,
    progress: bool = True,
) -> PatchResult:
    """Activation patching of every site of a sweep (or of `sites`), read at the final position.

    `granularity` and `position` choose the sweep (`sites_for`), or `sites` lists the sites (`Site`s, or
    `Component`s for their final-position outputs); `direction` chooses which run is the base. Returns one
    row per site with per-example metric values and normalised scores.
    """
    engine = _check_common(dataset, direction, engine, model)
    n_layers, n_heads = model_dims(model)
    n_pos = dataset.clean_tokens.shape[1]
    if sites is None:
        sites = sites_for(granularity, n_layers=n_layers, n_heads=n_heads, n_pos=n_pos, position=position)
    else:
        granularity, position = "sites", "sites"  # an explicit list: each site names its own position
    _check_components(sites, n_layers, n_heads, n_pos)
    run = partial(_patch_fast, w=weights(model)) if engine == "fast" else _patch_tl  # weights read once, not per batch
    clean, corrupted, patched = run_in_batches(
        dataset, batch_size, lambda part, bar: run(model, part, metric, sites, direction, progress=bar), progress
    )
    return PatchResult(
        components=list(sites), metric=metric, patched=patched, clean=clean, corrupted=corrupted,
        info={"engine": engine, "direction": direction, "granularity": granularity, "position": position},
    )  # fmt: skip


def patch_components(
    model,
    dataset: Dataset,
    *,
    metric: str = "logit_diff",
    components: list[Component] | None = None,
    engine: Engine = "auto",
    batch_size: int = 64,
    progress: bool = True,
    direction: Direction = "denoising",
) -> PatchResult:
    """Activation patching of head outputs (`hook_z`) and MLP outputs at the final position.

    For each component, the base prompts are run with that component's source-run output at the final
    position patched in; the metric (`arithinterp.metrics`) is read at the final position. The default sweep
    of `arithinterp patch`.
    """
    n_layers, n_heads = model_dims(model)
    components = components if components is not None else all_components(n_layers, n_heads)
    result = activation_patch(model, dataset, sites=components, metric=metric, engine=engine,
                              batch_size=batch_size, progress=progress, direction=direction)  # fmt: skip
    result.info = {"engine": result.info["engine"], "direction": direction, "position": "final"}
    return result


# ---------------------------------------------------------------------------------------------------------
# The fast engine


def _as_site(c: Component | Site, last: int) -> Site:
    if isinstance(c, Site):
        return c
    if c.kind == "head":
        return Site(activation="z", layer=c.layer, head=c.head, pos=last)
    return Site(activation="mlp_out", layer=c.layer, pos=last)


def weights(model) -> _gpt2.GPT2Weights:
    """The model's GPT-2 weights for the fast engines (`model._arithinterp_w` if a caller pinned them)."""
    return getattr(model, "_arithinterp_w", None) or _gpt2.extract_weights(model)


@dataclass
class Runs:
    """The two cached runs of a batch, the metric, and which run is the base."""

    w: _gpt2.GPT2Weights
    clean: _gpt2.Cache
    corrupted: _gpt2.Cache
    base: _gpt2.Cache
    source: _gpt2.Cache
    read: Callable[[Tensor], Tensor]  # final residual [..., batch, d_model] -> metric [..., batch]
    m_clean: Tensor
    m_corrupted: Tensor


@torch.no_grad()
def cached_runs(
    model, dataset: Dataset, metric_name: str, direction: str, *, w: _gpt2.GPT2Weights | None = None
) -> Runs:
    """Clean and corrupted runs of the functional GPT-2, and the metric read from a final residual.

    `w` is the model's `weights(model)`; pass it when calling once per batch so they are read only once.
    """
    w = w if w is not None else weights(model)
    clean = _gpt2.run_with_cache(w, dataset.clean_tokens)
    corr = _gpt2.run_with_cache(w, dataset.corrupted_tokens)
    clean_final_logits = _gpt2.unembed(w, clean.final[:, -1])
    metric = make_metric(metric_name, dataset, clean_logits=clean_final_logits if metric_name == "kl" else None)

    def read(x_final: Tensor) -> Tensor:  # (..., batch, d_model) -> (..., batch)
        return metric(_gpt2.unembed(w, x_final, metric.columns))

    base, source = (corr, clean) if direction == "denoising" else (clean, corr)
    return Runs(w=w, clean=clean, corrupted=corr, base=base, source=source, read=read,
                m_clean=read(clean.final[:, -1]), m_corrupted=read(corr.final[:, -1]))  # fmt: skip


def _start(site: Site) -> int:
    return 0 if site.pos is None else site.pos


def _head_z(w: _gpt2.GPT2Weights, site: Site, base: _gpt2.Cache, src: _gpt2.Cache, s: int) -> Tensor:
    """Head `site.head`'s output z at positions `s..` with its q, k, v or pattern patched: `[batch, suffix, d_head]`."""
    layer, h, p, act = site.layer, site.head, site.pos, site.activation
    if act == "pattern":
        pattern = src.pattern[layer][:, h] if p is None else base.pattern[layer][:, h].clone()  # (batch, q, k)
        if p is not None:
            pattern[:, p] = src.pattern[layer][:, h, p]
        return pattern[:, s:] @ base.v[layer][:, :, h]
    parts = {name: getattr(base, name)[layer][:, :, h : h + 1] for name in ("q", "k", "v")}  # (batch, pos, 1, d_head)
    new = getattr(src, act)[layer][:, :, h : h + 1]
    if p is None:
        parts[act] = new
    else:
        parts[act] = parts[act].clone()
        parts[act][:, p] = new[:, p]
    z, _ = _gpt2.attention(w, layer, parts["q"][:, s:], parts["k"], parts["v"], s)
    return z[:, :, 0]


def _site_delta(w: _gpt2.GPT2Weights, site: Site, base: _gpt2.Cache, src: _gpt2.Cache, s: int) -> Tensor:
    """The exact change the patch makes to the residual stream at its stage, positions `s..`.

    Shape `[batch, suffix, d_model]`."""
    layer, act = site.layer, site.activation
    if act in ("q", "k", "v", "pattern"):  # the head's output changes wherever its recomputed z does
        dz = _head_z(w, site, base, src, s) - base.z[layer][:, s:, site.head]
        return dz @ w.W_O[layer, site.head]
    if act == "z":
        delta = (src.z[layer][:, s:, site.head] - base.z[layer][:, s:, site.head]) @ w.W_O[layer, site.head]
    else:
        delta = getattr(src, act)[layer][:, s:] - getattr(base, act)[layer][:, s:]
    if site.pos is not None:  # only the patched position moves
        keep = torch.zeros(delta.shape[1], 1)
        keep[site.pos - s] = 1.0
        delta = delta * keep
    return delta


def _chunks(idx: list[int], starts: list[int], n_pos: int, per_pos: int) -> list[list[int]]:
    """Split patch indices (sorted by start) so a pass holds at most `_PASS_BUDGET` residual elements."""
    out: list[list[int]] = []
    for i in idx:
        if out:
            chunk = out[-1]
            s = starts[chunk[0]]
            if (len(chunk) + 1) * (n_pos - s) * per_pos <= _PASS_BUDGET:
                chunk.append(i)
                continue
        out.append([i])
    return out


@torch.no_grad()
def _patch_fast(
    model, dataset: Dataset, metric_name: str, items: list, direction: str, *, progress: bool, w: _gpt2.GPT2Weights
):
    r = cached_runs(model, dataset, metric_name, direction, w=w)
    w, base, src = r.w, r.base, r.source
    n_batch, n_pos = dataset.clean_tokens.shape
    sites = [_as_site(c, n_pos - 1) for c in items]
    starts = [_start(s) for s in sites]
    groups: dict[tuple[int, int], list[int]] = {}
    stage_order = {"pre": 0, "mid": 1, "post": 2}
    for i, site in enumerate(sites):
        groups.setdefault((site.layer, stage_order[_STAGE.get(site.activation, "mid")]), []).append(i)
    values = torch.empty(len(sites), n_batch)
    for layer, stage_i in tqdm(sorted(groups), desc="patching layers", disable=not progress):
        stage = ("pre", "mid", "post")[stage_i]
        idx = sorted(groups[(layer, stage_i)], key=lambda i: starts[i])
        for chunk in _chunks(idx, starts, n_pos, n_batch * w.W_E.shape[1]):
            s = starts[chunk[0]]
            x = getattr(base, f"resid_{stage}")[layer][:, s:]  # (batch, suffix, d_model)
            deltas = torch.stack(
                [_site_delta(w, sites[i], base, src, s) for i in chunk]
            )  # (patch, batch, suffix, d_model)
            out = _gpt2.run_suffix(w, base, layer, s, x + deltas, stage=stage, final_only=True)[..., -1, :]
            values[chunk] = r.read(out)
    return r.m_clean, r.m_corrupted, values


# ---------------------------------------------------------------------------------------------------------
# The transformer-lens engine


def _all_pos_setter(corrupted_activation, index, clean_activation):
    """Patch every position of a `[batch, pos, ...]` activation (index = [layer])."""
    corrupted_activation[:] = clean_activation
    return corrupted_activation


def _tl_plan(site: Site) -> tuple[str, Callable, list[str], list[int]]:
    """(activation name, transformer-lens patch setter, index columns, index row) for one site."""
    import transformer_lens.patching as tlp

    act, layer, h, p = site.activation, site.layer, site.head, site.pos
    if act == "pattern":
        if p is None:
            return act, tlp.layer_head_pattern_patch_setter, ["layer", "head_index"], [layer, h]
        return act, tlp.layer_head_pos_pattern_patch_setter, ["layer", "head_index", "dest_pos"], [layer, h, p]
    if act in HEAD_ACTIVATIONS:
        if p is None:
            return act, tlp.layer_head_vector_patch_setter, ["layer", "head_index"], [layer, h]
        return act, tlp.layer_pos_head_vector_patch_setter, ["layer", "pos", "head_index"], [layer, p, h]
    if p is None:
        return act, _all_pos_setter, ["layer"], [layer]
    return act, tlp.layer_pos_patch_setter, ["layer", "pos"], [layer, p]


def tl_runs(model, dataset: Dataset, metric_name: str, direction: str):
    """(metric on final-position logits, clean logits, corrupted logits, base tokens, source cache) on the bridge."""
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(dataset.clean_tokens)
        corr_logits, corr_cache = model.run_with_cache(dataset.corrupted_tokens)
    metric = make_metric(metric_name, dataset, clean_logits=clean_logits[:, -1] if metric_name == "kl" else None)

    def fn(logits: Tensor) -> Tensor:
        return metric.from_full_logits(logits[:, -1]).float()

    if direction == "denoising":
        return fn, clean_logits, corr_logits, dataset.corrupted_tokens, clean_cache, corr_cache
    return fn, clean_logits, corr_logits, dataset.clean_tokens, corr_cache, clean_cache


def _patch_tl(model, dataset: Dataset, metric_name: str, items: list, direction: str, *, progress: bool):
    """transformer-lens's `generic_activation_patch`, one forward pass per site."""
    import transformer_lens.patching as tlp

    fn, clean_logits, corr_logits, base_tokens, src_cache, _ = tl_runs(model, dataset, metric_name, direction)
    sites = [_as_site(c, dataset.clean_tokens.shape[1] - 1) for c in items]
    plans = [_tl_plan(s) for s in sites]
    groups: dict[tuple, list[int]] = {}
    for i, (act, setter, cols, _) in enumerate(plans):
        groups.setdefault((act, setter, tuple(cols)), []).append(i)
    values = torch.empty(len(sites), len(dataset))
    with torch.no_grad():
        for (act, setter, cols), idx in groups.items():
            df = pd.DataFrame([plans[i][3] for i in idx], columns=list(cols))
            res = tlp.generic_activation_patch(model, base_tokens, src_cache, fn, setter, act, index_df=df,
                                               reduce="none")  # fmt: skip
            values[idx] = res.values.float().cpu()
    return fn(clean_logits), fn(corr_logits), values
