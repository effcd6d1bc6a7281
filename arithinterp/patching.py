"""Activation patching of attention heads and MLPs.

The idea (Meng et al. 2022; Wang et al. 2022): run the model on a corrupted prompt whose answer differs, put
back one activation from the clean run, and measure how far the output moves back towards the clean answer.
A component whose clean activation restores the answer carries information the task needs. Scores are
normalised per `arithinterp.metrics`: 0 = corrupted run, 1 = clean run.

Two engines give the same numbers:

* `"fast"` (GPT-2 architecture): runs clean and corrupted once, then for each layer evaluates all of that
  layer's patches together, starting from the cached residual stream at that layer and recomputing only the
  patched position (attending to cached keys and values) - see `arithinterp._gpt2`.
* `"transformer-lens"`: `transformer_lens.patching.generic_activation_patch` on the bridge, one full forward
  pass per patch; works for any architecture the bridge loads.

`engine="auto"` picks the fast one when the model qualifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp import _gpt2
from arithinterp._errors import ArithInterpError
from arithinterp.metrics import Metric, bootstrap_ci, make_metric, normalise
from arithinterp.tasks import Dataset

Engine = Literal["auto", "fast", "transformer-lens"]


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
        import re

        m = re.fullmatch(r"L(\d+)H(\d+)", name) or re.fullmatch(r"MLP(\d+)", name)
        if m is None:
            raise ArithInterpError(f"component {name!r} is not a head 'L<layer>H<head>' or an MLP 'MLP<layer>'.")
        return cls(kind="head", layer=int(m[1]), head=int(m[2])) if name.startswith("L") else cls(kind="mlp", layer=int(m[1]))


def all_components(n_layers: int, n_heads: int) -> list[Component]:
    """Every head and MLP, layer by layer (heads first within a layer)."""
    out = []
    for layer in range(n_layers):
        out += [Component(kind="head", layer=layer, head=h) for h in range(n_heads)]
        out.append(Component(kind="mlp", layer=layer))
    return out


@dataclass(kw_only=True)
class PatchResult:
    """Per-component scores with their per-example metric values.

    `patched[c, i]` is the metric on example i with component c patched; `clean` and `corrupted` are the
    unpatched runs. `scores` are normalised (0 = corrupted, 1 = clean) with bootstrap intervals.
    """

    components: list[Component]
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

    def ranked(self) -> list[dict[str, Any]]:
        """Component records sorted by absolute score, largest first (the JSON contract)."""
        recs = [
            {"name": c.name, "kind": c.kind, "layer": c.layer, "head": c.head, "score": float(s),
             "ci": [float(lo), float(hi)]}
            for c, s, lo, hi in zip(self.components, self.scores, self.ci_low, self.ci_high)
        ]  # fmt: skip
        return sorted(recs, key=lambda r: -abs(r["score"]))

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


def _model_dims(model) -> tuple[int, int]:
    return int(model.cfg.n_layers), int(model.cfg.n_heads)


def _check_components(components: list[Component], n_layers: int, n_heads: int) -> None:
    for c in components:
        if not 0 <= c.layer < n_layers:
            raise ArithInterpError(f"component {c.name}: layer {c.layer} is out of range; the model has layers 0..{n_layers - 1}.")
        if c.kind == "head" and not 0 <= c.head < n_heads:
            raise ArithInterpError(f"component {c.name}: head {c.head} is out of range; the model has heads 0..{n_heads - 1}.")


def patch_components(
    model,
    dataset: Dataset,
    *,
    metric: str = "logit_diff",
    components: list[Component] | None = None,
    engine: Engine = "auto",
    batch_size: int = 64,
    progress: bool = True,
) -> PatchResult:
    """Denoising activation patching of head outputs (`hook_z`) and MLP outputs at the final position.

    For each component, the corrupted prompts are run with that component's clean output at the final
    position patched in; the metric (`arithinterp.metrics`) is read at the final position.
    """
    if len(dataset) == 0:
        raise ArithInterpError("the dataset is empty; pass n >= 1.")
    n_layers, n_heads = _model_dims(model)
    components = components if components is not None else all_components(n_layers, n_heads)
    _check_components(components, n_layers, n_heads)
    if engine == "auto":
        engine = "fast" if _gpt2.supports(model) else "transformer-lens"
    if engine == "fast":
        run = _patch_fast
    elif engine == "transformer-lens":
        run = _patch_tl
    else:
        raise ArithInterpError(f"unknown engine {engine!r}; choose auto, fast or transformer-lens.")
    chunks = []
    for start in range(0, len(dataset), batch_size):
        part = dataset.subset(list(range(start, min(start + batch_size, len(dataset)))))
        chunks.append(run(model, part, metric, components, progress=progress and start == 0))
    clean, corrupted, patched = (torch.cat([c[i] for c in chunks], dim=-1) for i in range(3))
    return PatchResult(
        components=components, metric=metric, patched=patched, clean=clean, corrupted=corrupted,
        info={"engine": engine, "direction": "denoising", "position": "final"},
    )  # fmt: skip


def _final_logits_metric(model_logits: Tensor, metric: Metric) -> Tensor:
    return metric.from_full_logits(model_logits[:, -1])


@torch.no_grad()
def _patch_fast(model, dataset: Dataset, metric_name: str, components: list[Component], *, progress: bool):
    w = _gpt2.extract_weights(model) if not hasattr(model, "_arithinterp_w") else model._arithinterp_w
    clean = _gpt2.run_with_cache(w, dataset.clean_tokens)
    corr = _gpt2.run_with_cache(w, dataset.corrupted_tokens)
    clean_final_logits = _gpt2.unembed(w, clean.final[:, -1])
    metric = make_metric(metric_name, dataset, clean_logits=clean_final_logits if metric_name == "kl" else None)

    def read(x_final: Tensor) -> Tensor:  # (..., batch, d_model) -> (..., batch)
        return metric(_gpt2.unembed(w, x_final, metric.columns))

    m_clean = read(clean.final[:, -1])
    m_corr = read(corr.final[:, -1])
    last = dataset.clean_tokens.shape[1] - 1
    values = torch.empty(len(components), len(dataset))
    by_layer: dict[int, list[int]] = {}
    for i, c in enumerate(components):
        by_layer.setdefault(c.layer, []).append(i)
    for layer in tqdm(sorted(by_layer), desc="patching layers", disable=not progress):
        idx = by_layer[layer]
        heads = [i for i in idx if components[i].kind == "head"]
        mlps = [i for i in idx if components[i].kind == "mlp"]
        if heads:
            h = torch.tensor([components[i].head for i in heads])
            dz = clean.z[layer][:, last, h] - corr.z[layer][:, last, h]  # (batch, patch, d_head)
            delta = torch.einsum("bpd,pdm->pbm", dz, w.W_O[layer][h])  # (patch, batch, d_model)
            mid = corr.resid_mid[layer][None, :, last] + delta
            out = _gpt2.run_suffix(w, corr, layer, last, mid[:, :, None], stage="mid")[:, :, -1]
            values[heads] = read(out)
        if mlps:
            post = corr.resid_mid[layer][:, last] + clean.mlp_out[layer][:, last]  # (batch, d_model)
            out = _gpt2.run_suffix(w, corr, layer, last, post[None, :, None], stage="post")[:, :, -1]
            values[mlps] = read(out).expand(len(mlps), -1)
    return m_clean, m_corr, values


def _patch_tl(model, dataset: Dataset, metric_name: str, components: list[Component], *, progress: bool):
    """transformer-lens's `generic_activation_patch`, one forward pass per component."""
    import transformer_lens.patching as tlp

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(dataset.clean_tokens)
        corr_logits = model(dataset.corrupted_tokens)
    metric = make_metric(metric_name, dataset, clean_logits=clean_logits[:, -1] if metric_name == "kl" else None)

    def fn(logits: Tensor) -> Tensor:
        return _final_logits_metric(logits, metric)

    last = dataset.clean_tokens.shape[1] - 1
    values = torch.empty(len(components), len(dataset))
    heads = [i for i, c in enumerate(components) if c.kind == "head"]
    mlps = [i for i, c in enumerate(components) if c.kind == "mlp"]
    with torch.no_grad():
        if heads:
            df = pd.DataFrame({"layer": [components[i].layer for i in heads], "pos": last,
                               "head_index": [components[i].head for i in heads]})  # fmt: skip
            res = tlp.generic_activation_patch(
                model, dataset.corrupted_tokens, clean_cache, fn, tlp.layer_pos_head_vector_patch_setter,
                "z", index_df=df, reduce="none",
            )  # fmt: skip
            values[heads] = res.values.float().cpu()
        if mlps:
            df = pd.DataFrame({"layer": [components[i].layer for i in mlps], "pos": last})
            res = tlp.generic_activation_patch(
                model, dataset.corrupted_tokens, clean_cache, fn, tlp.layer_pos_patch_setter, "mlp_out",
                index_df=df, reduce="none",
            )  # fmt: skip
            values[mlps] = res.values.float().cpu()
    return fn(clean_logits).float(), fn(corr_logits).float(), values
