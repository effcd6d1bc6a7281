"""Which entries of a Hugging Face model's weights belong to an attention head or an MLP.

Selective fine-tuning (`arithinterp.finetune`) trains exactly these entries and freezes the rest; this module
says what they are, for the two layouts it supports, and draws the random-components baseline.

What a head's slice is:

* GPT-2 (fused `attn.c_attn`, a Conv1D with weight `[d_model, 3 * d_model]`): head h's query, key and value
  columns `h*d_head:(h+1)*d_head` within each third, with the same entries of the bias; its W_O is rows
  `h*d_head:(h+1)*d_head` of `attn.c_proj.weight` `[d_model, d_model]`.
* LLaMA-style (separate `q_proj`, `k_proj`, `v_proj`, `o_proj` Linear layers, weight `[out, in]`): rows
  `h*d_head:(h+1)*d_head` of `q_proj` (and its bias, if any) and columns of `o_proj`. With grouped-query
  attention the key/value heads are shared: head h reads key/value head `h // (n_heads / n_kv_heads)`, so
  training head h trains its group's whole K/V slice, which every head of the group reads. finetune.json
  records the groups trained (`kv_groups`).
* The attention output bias and the layer norms belong to all heads of a layer and stay frozen. A selected MLP
  trains all of its weights and biases (GPT-2 `c_fc`, `c_proj`; LLaMA `gate_proj`, `up_proj`, `down_proj`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from arithinterp._errors import ArithInterpError
from arithinterp.patching import Component


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where the heads and MLPs of a model live. `kind` is "gpt2" (fused c_attn) or "llama" (q/k/v/o_proj)."""

    kind: Literal["gpt2", "llama"]
    n_layers: int
    n_heads: int
    n_kv_heads: int  # = n_heads without grouped-query attention
    d_head: int
    d_model: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


def layout(model) -> Layout:
    """Recognise a GPT-2-style or LLaMA-style model; anything else is refused with a clear error."""
    base = getattr(model, "base_model", model)
    if hasattr(base, "h") and hasattr(base.h[0], "attn") and hasattr(base.h[0].attn, "c_attn"):
        cfg = model.config
        return Layout(kind="gpt2", n_layers=len(base.h), n_heads=cfg.n_head, n_kv_heads=cfg.n_head,
                      d_head=cfg.n_embd // cfg.n_head, d_model=cfg.n_embd)  # fmt: skip
    if hasattr(base, "layers") and hasattr(base.layers[0], "self_attn") and hasattr(base.layers[0].self_attn, "q_proj"):
        cfg, attn = model.config, base.layers[0].self_attn
        n_heads = cfg.num_attention_heads
        d_head = attn.q_proj.out_features // n_heads
        n_kv = attn.k_proj.out_features // d_head
        return Layout(kind="llama", n_layers=len(base.layers), n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head,
                      d_model=attn.q_proj.in_features)  # fmt: skip
    raise ArithInterpError(
        f"model class {type(model).__name__} is neither GPT-2-style (attn.c_attn) nor LLaMA-style "
        "(self_attn.q_proj/k_proj/v_proj/o_proj); selective fine-tuning supports those two layouts."
    )


def _blocks(model):
    base = getattr(model, "base_model", model)
    return base.h if hasattr(base, "h") else base.layers


def check_components(components: Sequence[Component], lay: Layout) -> None:
    for c in components:
        if not 0 <= c.layer < lay.n_layers or (c.kind == "head" and not 0 <= c.head < lay.n_heads):
            raise ArithInterpError(
                f"component {c.name} is not in this model ({lay.n_layers} layers x {lay.n_heads} heads); "
                "use a circuit.json made for this model."
            )


def selection_masks(model, components: Sequence[Component]) -> dict[str, Bool[Tensor, ...]]:
    """For each parameter holding part of the selection, a boolean mask of its trainable entries.

    Parameters absent from the result hold none of the selection. See the module docstring for the slices.
    """
    lay = layout(model)
    check_components(components, lay)
    names = {id(p): n for n, p in model.named_parameters()}
    masks: dict[str, Tensor] = {}

    def mark(param: Tensor | None, index) -> None:
        if param is None:
            return
        name = names[id(param)]
        m = masks.setdefault(name, torch.zeros_like(param, dtype=torch.bool))
        m[index] = True

    dh, d = lay.d_head, lay.d_model
    for c in components:
        block = _blocks(model)[c.layer]
        if c.kind == "mlp":
            for p in block.mlp.parameters():
                mark(p, ...)
            continue
        rows = slice(c.head * dh, (c.head + 1) * dh)
        if lay.kind == "gpt2":
            attn = block.attn
            for part in range(3):  # q, k, v columns of the fused projection
                cols = slice(part * d + c.head * dh, part * d + (c.head + 1) * dh)
                mark(attn.c_attn.weight, (slice(None), cols))
                mark(attn.c_attn.bias, cols)
            mark(attn.c_proj.weight, (rows, slice(None)))  # Conv1D weight is [in, out]: W_O rows
        else:
            attn = block.self_attn
            g = c.head // lay.group_size
            kv = slice(g * dh, (g + 1) * dh)
            mark(attn.q_proj.weight, (rows, slice(None)))
            mark(attn.q_proj.bias, rows)
            for proj in (attn.k_proj, attn.v_proj):
                mark(proj.weight, (kv, slice(None)))
                mark(proj.bias, kv)
            mark(attn.o_proj.weight, (slice(None), rows))  # Linear weight is [out, in]: W_O columns
    return masks


def kv_groups(components: Sequence[Component], lay: Layout) -> dict[str, list[int]]:
    """Per layer, the key/value groups whose slice trains (LLaMA-style grouped-query attention)."""
    out: dict[str, set[int]] = {}
    for c in components:
        if c.kind == "head":
            out.setdefault(f"L{c.layer}", set()).add(c.head // lay.group_size)
    return {k: sorted(v) for k, v in sorted(out.items())}


def random_components(components: Sequence[Component], lay: Layout, seed: int) -> list[Component]:
    """As many random heads (and MLPs) as `components` has, drawn from outside it when there are enough."""
    rng = random.Random(f"random-arm:{seed}")
    heads = [Component(kind="head", layer=la, head=h) for la in range(lay.n_layers) for h in range(lay.n_heads)]
    mlps = [Component(kind="mlp", layer=la) for la in range(lay.n_layers)]
    chosen: list[Component] = []
    for pool, kind in ((heads, "head"), (mlps, "mlp")):
        k = sum(c.kind == kind for c in components)
        outside = [c for c in pool if c not in components]
        chosen += rng.sample(outside if len(outside) >= k else pool, k)
    return chosen
