"""Attribution patching: first-order estimates of activation and path patching from gradients.

Exact patching costs one (partial) forward pass per site. Attribution patching (Nanda 2023; Syed et al.
2023, "AtP") replaces each of them by a first-order Taylor estimate around the base run::

    M(patched) - M(base)  ~=  (a_source - a_base) . dM/da |base

so one clean pass, one corrupted pass and one backward pass score every site at once.

* **Node AtP** scores components: a head through its output `z`, an MLP through its output, at the final
  position (`position="final"`, the estimate of `arithinterp.patching.patch_components`) or at every
  position at once (`position="all"`).
* **Edge attribution patching** (EAP, Syed et al. 2023) scores direct edges sender -> receiver, the estimate
  of `arithinterp.path_patching.path_patch`: the sender's write difference summed over positions, dotted
  with the gradient at the receiver's own input (a head's query/key/value input, an MLP's input, or the
  final residual for the logits).
* **EAP-IG** (Hanna et al. 2024) replaces the single gradient at the base run by the mean gradient along a
  straight path of the input embeddings from the base prompt to the source prompt (`ig_steps` points,
  midpoint rule), which repairs the estimate where attention or the metric saturates. With `ig_steps`
  points the cost is `ig_steps` forward and backward passes.

Every estimate is returned as a `PatchResult` whose `patched` rows are `M(base) + estimate` per example, so
scores are normalised (0 = corrupted, 1 = clean) and compared with exact patching on the same scale;
`agreement` reports the Spearman rank correlation with the exact scores.

Gradients come from the functional GPT-2 (`arithinterp._gpt2`) with zero-valued "probe" tensors added at
every node and every receiver input: the gradient with respect to a probe is the gradient with respect to
that activation. GPT-2 architecture only; use exact patching (`engine="transformer-lens"`) elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp import _gpt2
from arithinterp._errors import ArithInterpError
from arithinterp.metrics import spearman
from arithinterp.patching import (
    Component,
    Direction,
    PatchResult,
    Runs,
    _check_common,
    all_components,
    cached_runs,
    model_dims,
    weights,
)
from arithinterp.path_patching import Edge, Receiver, sender_delta
from arithinterp.tasks import Dataset

Method = Literal["atp", "eap-ig"]
METHODS = ("atp", "eap-ig")


@dataclass(kw_only=True)
class AttributionResult:
    """Node estimates (heads and MLPs) and, for edge granularity, edge estimates, both as `PatchResult`s."""

    nodes: PatchResult
    edges: PatchResult | None = None


def _probed_forward(
    w: _gpt2.GPT2Weights, x0: Float[Tensor, "batch pos d_model"], *, edges: bool
) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """A differentiable forward pass from the input embeddings with zero probes at every node and reader.

    Probes (leaf tensors, all zero): `z[layer]` `[batch, pos, head, d_head]` added to each head's output,
    `mlp_out[layer]` `[batch, pos, d_model]` to each MLP's output; with `edges`, also `q_in`, `k_in`, `v_in`
    `[batch, pos, head, d_model]` added to each head's own copy of its input, `mlp_in[layer]` to the MLP's
    input and `final` `[batch, pos, d_model]` to the final residual. Returns (final residual, probes).
    """
    batch, n_pos, d_model = x0.shape
    n_heads = w.n_heads
    probes: dict[str, list[Tensor]] = {k: [] for k in ("z", "mlp_out", "q_in", "k_in", "v_in", "mlp_in", "final")}

    def probe(name: str, *shape: int) -> Tensor:
        t = torch.zeros(*shape, requires_grad=True)
        probes[name].append(t)
        return t

    x = x0
    for layer in range(w.n_layers):
        if edges:
            qkv = []
            for which, W, b in (("q", w.W_Q, w.b_Q), ("k", w.W_K, w.b_K), ("v", w.W_V, w.b_V)):
                xin = x[:, :, None, :] + probe(
                    f"{which}_in", batch, n_pos, n_heads, d_model
                )  # (batch, pos, head, d_model)
                h = _gpt2.layer_norm(xin, w.ln1_w[layer], w.ln1_b[layer], w.eps)
                qkv.append(torch.einsum("bphm,hmd->bphd", h, W[layer]) + b[layer])
            q, k, v = qkv
        else:
            q, k, v = _gpt2.qkv(w, layer, x)
        z, _ = _gpt2.attention(w, layer, q, k, v)
        z = z + probe("z", *z.shape)
        x = x + _gpt2.z_to_out(w, layer, z)
        mlp_x = x + probe("mlp_in", batch, n_pos, d_model) if edges else x
        out = _gpt2.mlp(w, layer, mlp_x)[1]
        x = x + out + probe("mlp_out", batch, n_pos, d_model)
    if edges:
        x = x + probe("final", batch, n_pos, d_model)
    return x, probes


def _gradients(
    w, x_base: Tensor, x_src: Tensor, read: Callable[[Tensor], Tensor], alphas: list[float], *, edges: bool
) -> dict[str, list[Tensor]]:
    """Probe gradients of the summed metric (`read`: final residual -> metric, as `Runs.read`), averaged over
    inputs `x_base + alpha * (x_src - x_base)`."""
    total: dict[str, list[Tensor]] | None = None
    for alpha in alphas:
        with torch.enable_grad():
            final, probes = _probed_forward(w, x_base + alpha * (x_src - x_base), edges=edges)
            value = read(final[:, -1]).sum()
            leaves = [t for ts in probes.values() for t in ts]
            grads = torch.autograd.grad(value, leaves)
        it = iter(grads)
        g = {k: [next(it) for _ in ts] for k, ts in probes.items()}
        total = g if total is None else {k: [a + b for a, b in zip(total[k], g[k])] for k in g}
    return {k: [t / len(alphas) for t in ts] for k, ts in total.items()}


def _writes(w, base: _gpt2.Cache, src: _gpt2.Cache, senders: list[Component]) -> Tensor:
    """Each sender's source-minus-base write `[sender, batch, pos, d_model]`."""
    return torch.stack([sender_delta(w, s, base, src) for s in senders])


def attribution_patch(
    model,
    dataset: Dataset,
    *,
    method: Method = "atp",
    granularity: Literal["node", "edge"] = "node",
    position: Literal["final", "all"] = "final",
    ig_steps: int = 5,
    components: list[Component] | None = None,
    receivers: list[Receiver] | None = None,
    direction: Direction = "denoising",
    metric: str = "logit_diff",
    batch_size: int = 32,
    progress: bool = True,
) -> AttributionResult:
    """Attribution patching estimates for every head and MLP (and, with `granularity="edge"`, every edge).

    `method="atp"` takes the gradient at the base run (AtP / EAP); `"eap-ig"` averages it over `ig_steps`
    points between the base and source inputs. Node estimates are for the final position (`position`) or
    all positions; edge estimates always sum over positions (the sender's write everywhere, as in
    `path_patch`). `receivers` defaults to every head input, MLP input and the logits.
    """
    if method not in METHODS:
        raise ArithInterpError(f"unknown attribution method {method!r}; choose atp or eap-ig.")
    if granularity not in ("node", "edge"):
        raise ArithInterpError(f"unknown granularity {granularity!r} for attribution patching; choose node or edge.")
    if position not in ("final", "all"):
        raise ArithInterpError(f"position {position!r}: attribution patching estimates final or all positions.")
    if method == "eap-ig" and ig_steps < 1:
        raise ArithInterpError(f"ig_steps={ig_steps} must be >= 1 (5 to 20 is typical).")
    if _check_common(dataset, direction, "auto", model) != "fast":
        raise ArithInterpError("attribution patching implements the GPT-2 architecture only; "
                               "use exact activation patching (--method activation) for this model.")  # fmt: skip
    n_layers, n_heads = model_dims(model)
    components = list(components) if components is not None else all_components(n_layers, n_heads)
    if receivers is None:
        receivers = [Receiver(kind="logits")] + [r for c in all_components(n_layers, n_heads) for r in Receiver.of(c)]
    edge_list = [Edge(sender=s, receiver=r) for r in receivers for s in components if r.reads_from(s)]
    alphas = [0.0] if method == "atp" else [(k + 0.5) / ig_steps for k in range(ig_steps)]
    w = weights(model)
    node_rows, edge_rows, cleans, corrs = [], [], [], []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc=f"attribution ({method})", disable=not progress or len(starts) == 1):
        part = dataset.subset(list(range(start, min(start + batch_size, len(dataset)))))
        runs = cached_runs(model, part, metric, direction, w=w)
        n, e = _attribute_batch(runs, part, direction, components, edge_list, alphas, edges=granularity == "edge",
                                position=position)  # fmt: skip
        node_rows.append(n)
        edge_rows.append(e)
        cleans.append(runs.m_clean)
        corrs.append(runs.m_corrupted)
    clean, corrupted = torch.cat(cleans), torch.cat(corrs)
    info = {"method": method, "direction": direction, "position": position,
            "ig_steps": ig_steps if method == "eap-ig" else None}  # fmt: skip
    nodes = PatchResult(components=components, metric=metric, patched=torch.cat(node_rows, -1), clean=clean,
                        corrupted=corrupted, info=dict(info))  # fmt: skip
    edges = None
    if granularity == "edge":
        edges = PatchResult(components=edge_list, metric=metric, patched=torch.cat(edge_rows, -1), clean=clean,
                            corrupted=corrupted, info={**info, "position": "all"})  # fmt: skip
    return AttributionResult(nodes=nodes, edges=edges)


def _attribute_batch(runs: Runs, dataset, direction, components, edge_list, alphas, *, edges, position):
    """Node estimates `[component, batch]` and, with `edges`, edge estimates `[edge, batch]` (else None) on
    one batch, from its cached runs."""
    w, base, src = runs.w, runs.base, runs.source
    m_base = runs.m_corrupted if direction == "denoising" else runs.m_clean
    base_tokens, src_tokens = (
        (dataset.corrupted_tokens, dataset.clean_tokens) if direction == "denoising"
        else (dataset.clean_tokens, dataset.corrupted_tokens)
    )  # fmt: skip
    g = _gradients(w, _gpt2.embed(w, base_tokens), _gpt2.embed(w, src_tokens), runs.read, alphas, edges=edges)
    with torch.no_grad():
        node_est = []
        for c in components:
            if c.kind == "head":
                d = (src.z[c.layer][:, :, c.head] - base.z[c.layer][:, :, c.head]) * g["z"][c.layer][:, :, c.head]
            else:
                d = (src.mlp_out[c.layer] - base.mlp_out[c.layer]) * g["mlp_out"][c.layer]
            per_pos = d.sum(-1)  # (batch, pos)
            node_est.append(per_pos[:, -1] if position == "final" else per_pos.sum(-1))
        nodes = m_base + torch.stack(node_est)
        if not edges:
            return nodes, None
        senders = list(dict.fromkeys(e.sender for e in edge_list))
        writes = _writes(w, base, src, senders)  # (sender, batch, pos, d_model)
        index = {s: i for i, s in enumerate(senders)}
        receivers = list(dict.fromkeys(e.receiver for e in edge_list))
        grads = torch.stack([_receiver_grad(g, r) for r in receivers])  # (receiver, batch, pos, d_model)
        est = torch.einsum("sbpm,rbpm->srb", writes, grads)  # (sender, receiver, batch)
        r_index = {r: i for i, r in enumerate(receivers)}
        edge_est = torch.stack([est[index[e.sender], r_index[e.receiver]] for e in edge_list])
        return nodes, m_base + edge_est


def _receiver_grad(g: dict[str, list[Tensor]], r: Receiver) -> Tensor:
    if r.kind == "logits":
        return g["final"][0]
    if r.kind == "mlp":
        return g["mlp_in"][r.layer]
    return g[f"{r.input}_in"][r.layer][:, :, r.head]


def agreement(estimate: PatchResult, exact: PatchResult) -> dict[str, float]:
    """How well an estimate ranks the same items as exact patching: Spearman's rho over the items both
    score (matched by name), the Pearson correlation, and the largest absolute score difference."""
    exact_scores = {c.name: float(s) for c, s in zip(exact.components, exact.scores)}
    pairs = [(float(s), exact_scores[c.name]) for c, s in zip(estimate.components, estimate.scores)
             if c.name in exact_scores]  # fmt: skip
    if len(pairs) < 2:
        raise ArithInterpError("the estimate and the exact result share fewer than two items; nothing to compare.")
    a, b = torch.tensor(pairs, dtype=torch.float64).T
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return {"spearman": spearman(a, b), "pearson": pearson, "max_abs_diff": float((a - b).abs().max()),
            "n": len(pairs)}  # fmt: skip
