"""Ablation runs: the clean prompts run once per set of heads and MLPs, with that set ablated.

The primitive behind faithfulness, knockouts and transfer (`arithinterp.localize`). Ablation replaces a
head's output `hook_z` (per head) or an MLP's output `hook_mlp_out`, at every position or only the final one,
by its mean over the clean prompts of a reference dataset, position by position (`"mean"`); its value on the
example's own counterfactual prompt (`"resample"`); or zero (`"zero"`: a head's z is zeroed, so the attention
output bias `b_O`, which belongs to no head, stays). Replacement values always come from the unablated model.

Two engines give the same numbers (tested to 1e-5):

* `"hooks"`: the bridge with transformer-lens hooks, one forward pass per component set; any architecture.
* `"fast"` (GPT-2 architecture): every component set in one batched functional pass (`arithinterp._gpt2`),
  the residual shared across sets until the first ablated layer, the last layer computed at the final
  position only, and, when only the final position is ablated, everything before it read from the clean run.
  Identical sets are evaluated once (random sets of a small model repeat).

Axis names: `set` (one component set per row), `batch`, `pos`, `layer`, `head`, `d_head`, `d_model`, `d_vocab`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp import _gpt2
from arithinterp._errors import ArithInterpError, check_choice
from arithinterp.circuit import as_components
from arithinterp.metrics import make_metric
from arithinterp.patching import Component, model_dims
from arithinterp.tasks import Dataset, answer_correct

ABLATIONS = ("mean", "resample", "zero")
POSITIONS = ("all", "final")

Ablation = Literal["mean", "resample", "zero"]
Positions = Literal["all", "final"]
AblationEngine = Literal["auto", "fast", "hooks"]


@dataclass(kw_only=True)
class AblationRuns:
    """The clean prompts run once per component set, with that set ablated.

    `values[s, i]` is the metric and `correct[s, i]` whether the greedy answer is right, on example i with
    set s ablated; `full*` are the unablated clean run and `corrupted` the unablated counterfactual run.
    """

    metric: str
    ablation: str
    positions: str
    engine: str
    values: Float[Tensor, "set batch"]
    correct: Float[Tensor, "set batch"]
    full: Float[Tensor, " batch"]
    full_correct: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]


def _masks(
    sets: Sequence[Iterable[Component]], n_layers: int, n_heads: int
) -> tuple[Bool[Tensor, "set layer head"], Bool[Tensor, "set layer"]]:
    """Which heads / MLPs each set ablates."""
    heads = torch.zeros(len(sets), n_layers, n_heads, dtype=torch.bool)
    mlps = torch.zeros(len(sets), n_layers, dtype=torch.bool)
    for s, comps in enumerate(sets):
        for c in comps:
            if not 0 <= c.layer < n_layers or (c.kind == "head" and not 0 <= c.head < n_heads):
                raise ArithInterpError(
                    f"component {c.name} is not in this model ({n_layers} layers, {n_heads} heads); "
                    "check the circuit was made for this model."
                )
            if c.kind == "head":
                heads[s, c.layer, c.head] = True
            else:
                mlps[s, c.layer] = True
    return heads, mlps


def _full_cache(model, tokens: Tensor, engine: str) -> tuple[list[Tensor], list[Tensor], Tensor, _gpt2.Cache | None]:
    """(z per layer [batch, pos, head, d_head], mlp_out per layer [batch, pos, d_model], final logits, the
    functional engine's whole cache or None)."""
    n_layers, _ = model_dims(model)
    if engine == "fast":
        w = _gpt2.extract_weights(model)
        c = _gpt2.run_with_cache(w, tokens)
        return c.z, c.mlp_out, _gpt2.unembed(w, c.final[:, -1]), c
    logits, cache = model.run_with_cache(tokens)
    z = [cache[f"blocks.{layer}.attn.hook_z"].float() for layer in range(n_layers)]
    m = [cache[f"blocks.{layer}.hook_mlp_out"].float() for layer in range(n_layers)]
    return z, m, logits[:, -1].float(), None


def _replacements(model, dataset: Dataset, ablation: str, reference: Dataset | None, engine: str, clean, corrupted):
    """Values ablated components take: per layer z `[batch|1, pos, head, d_head]`, mlp `[batch|1, pos, d_model]`.

    `clean` and `corrupted` are the dataset's `_full_cache` results (reused, not recomputed).
    """
    n_layers, n_heads = model_dims(model)
    pos = dataset.clean_tokens.shape[1]
    if ablation == "zero":
        d_head, d_model = int(model.cfg.d_head), int(model.cfg.d_model)
        return [torch.zeros(1, pos, n_heads, d_head)] * n_layers, [torch.zeros(1, pos, d_model)] * n_layers
    if ablation == "resample":
        return corrupted[0], corrupted[1]
    if reference is not None and reference.clean_tokens.shape[1] != pos:
        raise ArithInterpError(
            f"the mean-ablation reference prompts have {reference.clean_tokens.shape[1]} tokens but the dataset's "
            f"have {pos}; pass a reference dataset with the same template (position-wise means need aligned positions)."
        )
    z, m = (clean if reference is None else _full_cache(model, reference.clean_tokens, engine))[:2]
    return [x.mean(0, keepdim=True) for x in z], [x.mean(0, keepdim=True) for x in m]


def _run_fast(
    w: _gpt2.GPT2Weights,
    tokens: Tensor,
    head_abl: Bool[Tensor, "set layer head"],
    mlp_abl: Bool[Tensor, "set layer"],
    z_rep: list[Tensor],
    mlp_rep: list[Tensor],
    pos_mask: Bool[Tensor, " pos"],
) -> Float[Tensor, "set batch d_vocab"]:
    """Final-position logits with each set's components ablated, all sets in one batched pass.

    The residual stays shared (no `set` axis) until the first layer that ablates something; the last layer
    computes keys and values at every position but queries, attention output and MLP at the final one only.
    """
    x = _gpt2.embed(w, tokens)  # (batch, pos, d_model)
    for layer in range(w.n_layers):
        q, k, v = _gpt2.qkv(w, layer, x)  # (..., batch, pos, head, d_head)
        keep = slice(None)
        if layer == w.n_layers - 1:  # only the final position feeds the logits
            keep = slice(-1, None)
            q, x = q[..., keep, :, :], x[..., keep, :]
        z, _ = _gpt2.attention(w, layer, q, k, v, k.shape[-3] - q.shape[-3])  # (..., batch, pos, head, d_head)
        pm = pos_mask[keep]
        if head_abl[:, layer].any():
            abl = head_abl[:, layer][:, None, None, :, None] & pm[None, None, :, None, None]  # (set, 1, pos, head, 1)
            z = torch.where(abl, z_rep[layer][..., keep, :, :], z)
        x = x + _gpt2.z_to_out(w, layer, z)
        _, m = _gpt2.mlp(w, layer, x)
        if mlp_abl[:, layer].any():
            abl = mlp_abl[:, layer][:, None, None, None] & pm[None, None, :, None]  # (set, 1, pos, 1)
            m = torch.where(abl, mlp_rep[layer][..., keep, :], m)
        x = x + m
    x = x.expand(head_abl.shape[0], *x.shape[-3:]) if x.dim() == 3 else x  # no set ablated anything
    return _gpt2.unembed(w, x[:, :, -1])


def _run_fast_final(
    w: _gpt2.GPT2Weights,
    cache: _gpt2.Cache,
    bi: slice,
    head_abl: Bool[Tensor, "set layer head"],
    mlp_abl: Bool[Tensor, "set layer"],
    z_rep: list[Tensor],
    mlp_rep: list[Tensor],
) -> Float[Tensor, "set batch d_vocab"]:
    """`_run_fast` when only the final position is ablated: every earlier position is exactly the clean run
    (causality), so only the final position is recomputed, attending to the clean run's cached keys/values."""
    x = cache.resid_pre[0][bi, -1:]  # (batch, 1, d_model)
    for layer in range(w.n_layers):
        q, k, v = _gpt2.qkv(w, layer, x)  # (..., batch, 1, head, d_head)
        shape = (*k.shape[:-3], cache.k[layer].shape[1] - 1, *k.shape[-2:])
        k = torch.cat([cache.k[layer][bi, :-1].expand(shape), k], dim=-3)  # (..., batch, pos, head, d_head)
        v = torch.cat([cache.v[layer][bi, :-1].expand(shape), v], dim=-3)
        z, _ = _gpt2.attention(w, layer, q, k, v, k.shape[-3] - 1)
        if head_abl[:, layer].any():
            z = torch.where(head_abl[:, layer][:, None, None, :, None], z_rep[layer][..., -1:, :, :], z)
        x = x + _gpt2.z_to_out(w, layer, z)
        _, m = _gpt2.mlp(w, layer, x)
        if mlp_abl[:, layer].any():
            m = torch.where(mlp_abl[:, layer][:, None, None, None], mlp_rep[layer][..., -1:, :], m)
        x = x + m
    x = x.expand(head_abl.shape[0], *x.shape[-3:]) if x.dim() == 3 else x  # no set ablated anything
    return _gpt2.unembed(w, x[:, :, -1])


def _run_hooks(
    model,
    tokens: Tensor,
    head_abl: Bool[Tensor, "set layer head"],
    mlp_abl: Bool[Tensor, "set layer"],
    z_rep: list[Tensor],
    mlp_rep: list[Tensor],
    pos_mask: Bool[Tensor, " pos"],
) -> Float[Tensor, "set batch d_vocab"]:
    """Final-position logits with each set's components ablated: one hooked bridge pass per set."""
    pos_idx = pos_mask.nonzero()[:, 0]
    out = []
    for s in range(head_abl.shape[0]):
        hooks = []
        for layer in range(head_abl.shape[1]):
            heads = head_abl[s, layer].nonzero()[:, 0]
            if len(heads):

                def hook_z(z, hook, layer=layer, heads=heads):
                    z = z.clone()
                    rep = z_rep[layer].to(z.dtype).expand(z.shape[0], -1, -1, -1)  # (batch, pos, head, d_head)
                    z[:, pos_idx[:, None], heads] = rep[:, pos_idx[:, None], heads]
                    return z

                hooks.append((f"blocks.{layer}.attn.hook_z", hook_z))
            if mlp_abl[s, layer]:

                def hook_mlp(m, hook, layer=layer):
                    m = m.clone()
                    rep = mlp_rep[layer].to(m.dtype).expand(m.shape[0], -1, -1)  # (batch, pos, d_model)
                    m[:, pos_idx] = rep[:, pos_idx]
                    return m

                hooks.append((f"blocks.{layer}.hook_mlp_out", hook_mlp))
        out.append(model.run_with_hooks(tokens, fwd_hooks=hooks)[:, -1].float())
    return torch.stack(out)


def _sets_per_pass(batch: int, pos: int, d_model: int, d_mlp: int, d_vocab: int) -> int:
    """How many component sets one batched pass evaluates, keeping each activation tensor near 64 M floats."""
    per_set = batch * max(pos * max(d_model, d_mlp), d_vocab)
    return max(1, int(64_000_000 // max(per_set, 1)))


@torch.no_grad()
def run_ablations(
    model,
    dataset: Dataset,
    sets: Sequence[Iterable[Component | str]],
    *,
    ablation: Ablation = "mean",
    metric: str = "logit_diff",
    positions: Positions = "all",
    reference: Dataset | None = None,
    engine: AblationEngine = "auto",
    batch_size: int = 256,
    progress: bool = False,
) -> AblationRuns:
    """Run the clean prompts once per component set with that set ablated; see the module docstring.

    `reference` (mean ablation only) is the dataset whose clean prompts give the means (default: `dataset`).
    """
    check_choice("ablation", ablation, ABLATIONS)
    check_choice("positions", positions, POSITIONS)
    if len(dataset) == 0:
        raise ArithInterpError("the dataset is empty; pass n >= 1.")
    if engine == "auto":
        engine = "fast" if _gpt2.supports(model) else "hooks"
    check_choice("engine", engine, ("fast", "hooks"))
    n_layers, n_heads = model_dims(model)
    head_abl, mlp_abl = _masks([as_components(s) for s in sets], n_layers, n_heads)
    # evaluate each distinct set once (random sets of a small model repeat often)
    flat = torch.cat([head_abl.flatten(1), mlp_abl], dim=1)
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
    head_abl, mlp_abl = unique[:, : n_layers * n_heads].reshape(-1, n_layers, n_heads), unique[:, n_layers * n_heads :]
    w = _gpt2.extract_weights(model) if engine == "fast" else None
    pos = dataset.clean_tokens.shape[1]
    pos_mask = torch.ones(pos, dtype=torch.bool) if positions == "all" else torch.arange(pos) == pos - 1
    clean, corrupted = (
        _full_cache(model, dataset.clean_tokens, engine),
        _full_cache(model, dataset.corrupted_tokens, engine),
    )
    z_rep, mlp_rep = _replacements(model, dataset, ablation, reference, engine, clean, corrupted)
    full_logits, corr_logits = clean[2], corrupted[2]
    m = make_metric(metric, dataset, clean_logits=full_logits if metric == "kl" else None)
    values = torch.empty(len(unique), len(dataset))
    correct = torch.empty(len(unique), len(dataset))
    d_vocab = int(full_logits.shape[-1])
    step = _sets_per_pass(min(batch_size, len(dataset)), pos, int(model.cfg.d_model), int(model.cfg.d_mlp), d_vocab)
    step = step if engine == "fast" else 1
    chunks = [(b, s) for b in range(0, len(dataset), batch_size) for s in range(0, len(unique), step)]
    for b0, s0 in tqdm(chunks, desc=f"{ablation}-ablation runs", disable=not progress or len(chunks) < 2):
        bi, si = slice(b0, b0 + batch_size), slice(s0, s0 + step)
        part = dataset.subset(list(range(len(dataset)))[bi])

        def rep(x: Tensor, bi: slice = bi) -> Tensor:
            return x if x.shape[0] == 1 else x[bi]

        args = (head_abl[si], mlp_abl[si], [rep(x) for x in z_rep], [rep(x) for x in mlp_rep], pos_mask)
        if engine == "hooks":
            logits = _run_hooks(model, part.clean_tokens, *args)
        elif positions == "final":
            logits = _run_fast_final(w, clean[3], bi, *args[:4])
        else:
            logits = _run_fast(w, part.clean_tokens, *args)
        pm = make_metric(metric, part, clean_logits=full_logits[bi] if metric == "kl" else None)
        values[si, bi] = pm.from_full_logits(logits)
        correct[si, bi] = answer_correct(logits, part).float()
    return AblationRuns(
        metric=metric, ablation=ablation, positions=positions, engine=engine, values=values[inverse],
        correct=correct[inverse], full=m.from_full_logits(full_logits),
        full_correct=answer_correct(full_logits, dataset).float(), corrupted=m.from_full_logits(corr_logits),
    )  # fmt: skip
