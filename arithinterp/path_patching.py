"""Path patching: the effect of sender components on chosen receivers only.

Activation patching says a head matters; path patching says *through what*. A sender (a head or an MLP)
writes a vector into the residual stream that every later component reads. Path patching (Wang et al. 2022;
Goldowsky-Dill et al. 2023) changes that write for some readers only - the *receivers* - and holds every
other edge at its value in the base run:

* the logits (the final residual stream, read by the unembedding),
* a head's query, key or value input (`L3H1.q`, `L3H1.k`, `L3H1.v`; `L3H1` means all three),
* an MLP's input (`MLP3`).

Concretely, with `delta = source write - base write` of the sender at every position, each receiver reads
`base residual + delta` (its layer norm recomputed on the sum) while every other component reads the base
residual. The receivers' own outputs then change and propagate through the rest of the model as usual.
So a sender->receiver score is the exact effect of the *direct edge*; indirect routes through an MLP or a
head are edges of their own, found by iterating (`iterative_path_patch`): start from the logits, keep the
senders that matter, make them the receivers, and repeat - the procedure used to map the IOI and
greater-than circuits of GPT-2 small and the arithmetic heads of LLaMA-2.

Scores are normalised like activation patching (0 = corrupted run, 1 = clean run); directions as in
`arithinterp.patching` (denoising: base = corrupted, source = clean). A sender that cannot reach any
receiver (it sits at or after the receiver's layer) leaves the base run unchanged.

Engines: `"fast"` batches all senders of a sweep along a `patch` axis in the functional GPT-2
(`arithinterp._gpt2.block_edges`), starting at the first receiver's layer; `"transformer-lens"` adds the
sender's delta in hooks on the bridge's split Q/K/V inputs (`hook_q_input`...), `hook_mlp_in` and the last
`hook_resid_post`, one forward pass per sender.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp import _gpt2
from arithinterp._errors import ArithInterpError
from arithinterp.patching import (
    _PASS_BUDGET,
    Component,
    Direction,
    Engine,
    PatchResult,
    Runs,
    _check_common,
    _check_components,
    all_components,
    cached_runs,
    model_dims,
    run_in_batches,
    tl_runs,
    weights,
)
from arithinterp.tasks import Dataset


@dataclass(frozen=True, kw_only=True)
class Receiver:
    """What reads a sender's write: the logits, one input (`q`, `k`, `v`) of a head, or an MLP's input."""

    kind: Literal["logits", "head", "mlp"]
    layer: int | None = None
    head: int | None = None
    input: Literal["q", "k", "v"] | None = None

    def __post_init__(self) -> None:
        ok = {
            "logits": self.layer is None and self.head is None and self.input is None,
            "head": self.layer is not None and self.head is not None and self.input in ("q", "k", "v"),
            "mlp": self.layer is not None and self.head is None and self.input is None,
        }.get(self.kind, False)
        if not ok:
            raise ArithInterpError(f"malformed receiver {self!r}; build receivers with Receiver.parse('L3H1.q').")

    @property
    def name(self) -> str:
        if self.kind == "logits":
            return "logits"
        return f"L{self.layer}H{self.head}.{self.input}" if self.kind == "head" else f"MLP{self.layer}"

    @classmethod
    def parse(cls, name: str) -> list["Receiver"]:
        """`logits`, `MLP3`, `L3H1.q` / `.k` / `.v`, or `L3H1` (its query, key and value inputs)."""
        name = name.strip()
        if name == "logits":
            return [cls(kind="logits")]
        if m := re.fullmatch(r"MLP(\d+)", name):
            return [cls(kind="mlp", layer=int(m[1]))]
        if m := re.fullmatch(r"L(\d+)H(\d+)(?:\.([qkv]))?", name):
            inputs = [m[3]] if m[3] else ["q", "k", "v"]
            return [cls(kind="head", layer=int(m[1]), head=int(m[2]), input=i) for i in inputs]
        raise ArithInterpError(f"receiver {name!r} is not 'logits', 'MLP<layer>', 'L<layer>H<head>' or "
                               f"'L<layer>H<head>.q|k|v'.")  # fmt: skip

    @classmethod
    def of(cls, component: Component) -> list["Receiver"]:
        """The inputs of a component: a head's q, k and v inputs, or an MLP's input."""
        if component.kind == "head":
            return [cls(kind="head", layer=component.layer, head=component.head, input=i) for i in "qkv"]
        return [cls(kind="mlp", layer=component.layer)]

    def reads_from(self, sender: Component) -> bool:
        """True if `sender`'s write reaches this receiver along a direct edge."""
        if self.kind == "logits":
            return True
        if self.kind == "head":
            return sender.layer < self.layer
        return sender.layer < self.layer or (sender.kind == "head" and sender.layer == self.layer)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "head": self.head, "input": self.input}


@dataclass(frozen=True, kw_only=True)
class Edge:
    """A direct edge sender -> receiver, named `L0H1->L2H3.v`."""

    sender: Component
    receiver: Receiver
    kind: str = field(default="edge", init=False)

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver.name}"

    @property
    def layer(self) -> int:
        return self.sender.layer

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "edge", "sender": self.sender.name, "receiver": self.receiver.name}


def parse_receivers(names: str | Sequence[str | Receiver]) -> list[Receiver]:
    """Receivers from names (`Receiver.parse`), `Receiver`s, or a comma-separated string (`"L2H1,MLP2"`);
    duplicates dropped, order kept. The one reader of receiver names, for the library and the CLI alike."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[Receiver] = []
    for n in names:
        out += [r for r in (Receiver.parse(n) if isinstance(n, str) else [n]) if r not in out]
    if not out:
        raise ArithInterpError("no receivers given; pass e.g. --receivers logits or --receivers L2H1.v,MLP2.")
    return out


def parse_components(names: str | Sequence[str]) -> list[Component]:
    """Components from names or a comma-separated string (`"L0H1,MLP0"`)."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = [Component.parse(n.strip()) for n in names]
    if not out:
        raise ArithInterpError("no senders given; pass e.g. --senders L0H1,MLP0 (or leave it out for all).")
    return out


def _check_receivers(receivers: list[Receiver], n_layers: int, n_heads: int) -> None:
    for r in receivers:
        if r.kind != "logits" and not 0 <= r.layer < n_layers:
            raise ArithInterpError(f"receiver {r.name}: layer {r.layer} is out of range; the model has layers "
                                   f"0..{n_layers - 1}.")  # fmt: skip
        if r.kind == "head" and not 0 <= r.head < n_heads:
            raise ArithInterpError(f"receiver {r.name}: head {r.head} is out of range; the model has heads "
                                   f"0..{n_heads - 1}.")  # fmt: skip


def path_patch(
    model,
    dataset: Dataset,
    *,
    senders: list[Component] | None = None,
    receivers: Sequence[Receiver | str] = ("logits",),
    direction: Direction = "denoising",
    metric: str = "logit_diff",
    engine: Engine = "auto",
    batch_size: int = 64,
    progress: bool = True,
) -> PatchResult:
    """Path patching of each sender (default: every head and MLP) into all `receivers` at once.

    One row per sender: the metric when that sender's source-run write reaches the receivers (and only
    them) while everything else keeps its base-run value. `receivers` takes `Receiver`s, names, or one
    comma-separated string (`parse_receivers`).
    """
    senders = list(senders) if senders is not None else all_components(*model_dims(model))
    groups = [(senders, parse_receivers(receivers))]
    return _path_patch_groups(model, dataset, groups, direction=direction, metric=metric, engine=engine,
                              batch_size=batch_size, progress=progress)[0]  # fmt: skip


def _path_patch_groups(
    model,
    dataset: Dataset,
    groups: list[tuple[list[Component], list[Receiver]]],
    *,
    direction: str,
    metric: str,
    engine: str,
    batch_size: int,
    progress: bool,
    desc: str = "receivers",
) -> list[PatchResult]:
    """`path_patch` of several (senders, receivers) groups on the same prompts, one `PatchResult` per group.

    Each batch's clean and corrupted runs are computed once and shared by every group, rather than once per
    group (`patch_edges` and `iterative_path_patch` patch into many receivers one at a time).
    """
    engine = _check_common(dataset, direction, engine, model)
    n_layers, n_heads = model_dims(model)
    for senders, recv in groups:
        _check_components(senders, n_layers, n_heads)
        _check_receivers(recv, n_layers, n_heads)
    w = weights(model) if engine == "fast" else None

    def run(part: Dataset, first: bool) -> tuple[Tensor, Tensor, Tensor]:
        if engine == "fast":
            r = cached_runs(model, part, metric, direction, w=w)
            clean, corrupted = r.m_clean, r.m_corrupted
            patch = partial(_path_fast, r)
        else:
            runs = tl_runs(model, part, metric, direction)
            fn, clean_logits, corr_logits = runs[:3]
            clean, corrupted = fn(clean_logits), fn(corr_logits)
            patch = partial(_path_tl, model, runs)
        rows = []
        for senders, recv in groups:
            rows.append(patch(senders, recv, progress=first and len(groups) == 1))
            bar.update()
        return clean, corrupted, torch.cat(rows)  # (sender of every group, batch)

    n_batches = -(-len(dataset) // max(batch_size, 1))
    with tqdm(total=n_batches * len(groups), desc=desc, disable=not progress or len(groups) == 1) as bar:
        clean, corrupted, patched = run_in_batches(dataset, batch_size, run, progress)
    return [
        PatchResult(components=list(senders), metric=metric, patched=rows.clone(), clean=clean, corrupted=corrupted,
                    info={"engine": engine, "direction": direction, "method": "path",
                          "receivers": [r.name for r in recv]})
        for (senders, recv), rows in zip(groups, patched.split([len(s) for s, _ in groups]))
    ]  # fmt: skip


def patch_edges(
    model,
    dataset: Dataset,
    edges: list[Edge],
    *,
    direction: Direction = "denoising",
    metric: str = "logit_diff",
    engine: Engine = "auto",
    batch_size: int = 64,
    progress: bool = True,
) -> PatchResult:
    """Exact path patching of each edge on its own (a `path_patch` per receiver, all its senders batched, the
    clean and corrupted runs shared).

    The exact counterpart of edge attribution patching (`arithinterp.attribution_patching`).
    """
    if not edges:
        raise ArithInterpError("no edges to patch; pass at least one Edge(sender=..., receiver=...).")
    by_receiver: dict[Receiver, list[int]] = {}
    for i, e in enumerate(edges):
        by_receiver.setdefault(e.receiver, []).append(i)
    groups = [([edges[i].sender for i in idx], [rcv]) for rcv, idx in by_receiver.items()]
    results = _path_patch_groups(model, dataset, groups, direction=direction, metric=metric, engine=engine,
                                 batch_size=batch_size, progress=progress, desc="edges")  # fmt: skip
    patched = torch.empty(len(edges), len(dataset))
    for idx, res in zip(by_receiver.values(), results):
        patched[idx] = res.patched
    result = results[-1]
    return PatchResult(components=list(edges), metric=metric, patched=patched, clean=result.clean,
                       corrupted=result.corrupted, info={**result.info, "receivers": None})  # fmt: skip


def sender_delta(w, sender: Component, base, src) -> Tensor:
    """The sender's source-minus-base write into the residual stream: `[batch, pos, d_model]`."""
    if sender.kind == "head":
        dz = src.z[sender.layer][:, :, sender.head] - base.z[sender.layer][:, :, sender.head]
        return dz @ w.W_O[sender.layer, sender.head]
    return src.mlp_out[sender.layer] - base.mlp_out[sender.layer]


@torch.no_grad()
def _path_fast(r: Runs, senders: list[Component], receivers: list[Receiver], *, progress: bool) -> Tensor:
    """The metric `[sender, batch]` with each sender's write reaching `receivers` only, from cached runs `r`."""
    w, base, src = r.w, r.base, r.source
    n_batch, n_pos = base.final.shape[:2]
    n_layers = w.n_layers
    start = min(n_layers if x.kind == "logits" else x.layer for x in receivers)
    values = torch.empty(len(senders), n_batch)
    per_patch = n_batch * n_pos * w.W_E.shape[1]
    size = max(1, _PASS_BUDGET // per_patch)
    chunks = [list(range(i, min(i + size, len(senders)))) for i in range(0, len(senders), size)]
    for chunk in tqdm(chunks, desc="path patching", disable=not progress):
        delta = torch.stack([sender_delta(w, senders[i], base, src) for i in chunk])  # (patch, batch, pos, d_model)

        def masked(rcv: Receiver, delta=delta, chunk=chunk) -> Tensor:
            keep = torch.tensor([rcv.reads_from(senders[i]) for i in chunk], dtype=delta.dtype)
            return delta * keep[:, None, None, None]

        x = (base.resid_pre[start] if start < n_layers else base.final).expand(len(chunk), -1, -1, -1)
        for layer in range(start, n_layers):
            head_in = {(x_.input, x_.head): masked(x_) for x_ in receivers if x_.kind == "head" and x_.layer == layer}
            mlp_rcv = [x_ for x_ in receivers if x_.kind == "mlp" and x_.layer == layer]
            x = _gpt2.block_edges(w, layer, x, head_in=head_in, mlp_in=masked(mlp_rcv[0]) if mlp_rcv else None)
        final = x[..., -1, :]
        if any(x_.kind == "logits" for x_ in receivers):
            final = final + delta[..., -1, :]
        values[chunk] = r.read(final)
    return values


@contextmanager
def _edge_hooks_enabled(model, need_qkv: bool, need_mlp: bool):
    """Switch on the bridge's split Q/K/V inputs and `hook_mlp_in` for the duration, then restore them."""
    saved_split = bool(getattr(model.cfg, "use_split_qkv_input", False))
    saved_mlp = bool(getattr(model.cfg, "use_hook_mlp_in", False))
    try:
        if need_qkv and not saved_split:
            model.set_use_split_qkv_input(True)
        if need_mlp and not saved_mlp:
            model.set_use_hook_mlp_in(True)
        yield
    finally:
        if need_qkv and not saved_split:
            model.set_use_split_qkv_input(False)
        if need_mlp and not saved_mlp:
            model.set_use_hook_mlp_in(False)


def _path_tl(model, runs: tuple, senders: list[Component], receivers: list[Receiver], *, progress: bool) -> Tensor:
    """One bridge forward per sender, the sender's delta added in hooks at each receiver's input; `runs` is
    `tl_runs`'s result. Returns the metric `[sender, batch]`."""
    fn, _, _, base_tokens, src_cache, base_cache = runs
    n_layers = int(model.cfg.n_layers)

    def delta_of(sender: Component) -> Tensor:
        if sender.kind == "head":
            name = f"blocks.{sender.layer}.attn.hook_z"
            dz = src_cache[name][:, :, sender.head] - base_cache[name][:, :, sender.head]
            return dz @ model.blocks[sender.layer].attn.W_O[sender.head]
        name = f"blocks.{sender.layer}.hook_mlp_out"
        return src_cache[name] - base_cache[name]

    def add_hook(delta: Tensor, head: int | None):
        def hook(act, hook):
            act = act.clone()
            if head is None:
                act += delta
            else:
                act[:, :, head] += delta
            return act

        return hook

    values = torch.empty(len(senders), len(base_tokens))
    need_qkv = any(r.kind == "head" for r in receivers)
    need_mlp = any(r.kind == "mlp" for r in receivers)
    with torch.no_grad(), _edge_hooks_enabled(model, need_qkv, need_mlp):
        for i, sender in enumerate(tqdm(senders, desc="path patching", disable=not progress)):
            delta = delta_of(sender)
            hooks = []
            for rcv in receivers:
                if not rcv.reads_from(sender):
                    continue
                if rcv.kind == "head":
                    hooks.append((f"blocks.{rcv.layer}.attn.hook_{rcv.input}_input", add_hook(delta, rcv.head)))
                elif rcv.kind == "mlp":
                    hooks.append((f"blocks.{rcv.layer}.hook_mlp_in", add_hook(delta, None)))
                else:
                    hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", add_hook(delta, None)))
            values[i] = fn(model.run_with_hooks(base_tokens, fwd_hooks=hooks))
    return values


# ---------------------------------------------------------------------------------------------------------
# Iterative path patching


@dataclass(kw_only=True)
class PathGraph:
    """The result of iterative path patching: the edges kept, round by round.

    `edges[i]` records `sender`, `receiver`, `score` (normalised), `ci` and `round` (0 = into the logits).
    `results` holds every `path_patch` result that was run, keyed by receiver name.
    """

    edges: list[dict[str, Any]]
    results: dict[str, PatchResult]
    threshold: float
    direction: str

    def components(self) -> list[str]:
        """Every component on a kept edge, in the order found."""
        return list(dict.fromkeys(e["sender"] for e in self.edges))


def iterative_path_patch(
    model,
    dataset: Dataset,
    *,
    threshold: float = 0.1,
    max_rounds: int | None = None,
    senders: list[Component] | None = None,
    direction: Direction = "denoising",
    metric: str = "logit_diff",
    engine: Engine = "auto",
    batch_size: int = 64,
    progress: bool = True,
) -> PathGraph:
    """Map a circuit backwards from the logits by path patching.

    Round 0 patches every candidate sender into the logits; senders whose |effect| (score when denoising,
    1 - score when noising) is at least `threshold` are kept. Each kept component then becomes a receiver
    in the next round - a head through each of its query, key and value inputs separately, an MLP through its
    input - with every earlier candidate as a sender. Stops when no new component is found or after
    `max_rounds` rounds.
    """
    if threshold <= 0:
        raise ArithInterpError(f"threshold={threshold} must be > 0 (a fraction of the clean-corrupted gap, e.g. 0.1).")
    n_layers, n_heads = model_dims(model)
    candidates = list(senders) if senders is not None else all_components(n_layers, n_heads)
    frontier: list[Receiver] = [Receiver(kind="logits")]
    seen: set[Component] = set()
    edges: list[dict[str, Any]] = []
    results: dict[str, PatchResult] = {}
    rnd = 0
    while frontier and (max_rounds is None or rnd < max_rounds):
        found: list[Component] = []
        groups = [([s for s in candidates if rcv.reads_from(s)], [rcv]) for rcv in frontier]
        groups = [(valid, recv) for valid, recv in groups if valid]
        round_results = []
        if groups:  # every receiver of the round on the same cached runs
            round_results = _path_patch_groups(model, dataset, groups, direction=direction, metric=metric,
                                               engine=engine, batch_size=batch_size, progress=progress,
                                               desc=f"round {rnd}")  # fmt: skip
        for (valid, (rcv,)), res in zip(groups, round_results):
            results[rcv.name] = res
            for s, score, eff, lo, hi in zip(valid, res.scores, res.effects, res.ci_low, res.ci_high):
                if abs(float(eff)) >= threshold:
                    edges.append({"sender": s.name, "receiver": rcv.name, "score": float(score),
                                  "ci": [float(lo), float(hi)], "round": rnd})  # fmt: skip
                    if s not in seen:
                        seen.add(s)
                        found.append(s)
        frontier = [r for c in found for r in Receiver.of(c)]
        rnd += 1
    return PathGraph(edges=edges, results=results, threshold=threshold, direction=direction)
