"""A functional GPT-2 forward pass that patching can enter at any layer and position.

transformer-lens patches by re-running the whole model once per patch. Causality makes most of that work
redundant: a patch at layer L and position p leaves every activation below layer L, and every activation at
positions < p, exactly as in the unpatched run. This module re-implements the GPT-2 block as plain tensor
algebra over the model's own weights so that the patching engine can

* start from the cached residual stream at layer L instead of at the embedding,
* recompute only the positions p..end (one position for final-position patches), attending to the cached
  keys and values of the earlier positions,
* evaluate many patches at once, stacked along a leading `patch` axis,
* and unembed only the final position, optionally only the vocabulary columns the metric reads.

Axis names used throughout: `patch` (one row per patch in a sweep), `batch` (examples), `pos` (token position),
`suffix` (positions recomputed after a patch), `head`, `d_model`, `d_head`, `d_mlp`, `d_vocab`, `layer`.

Weights are read from the Hugging Face `GPT2LMHeadModel` inside a `TransformerBridge` (or given directly) and
kept in the transformer-lens layout (`W_Q[layer, head, d_model, d_head]`, ...). Only the GPT-2 architecture is
implemented; `supports(model)` says whether a model qualifies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from arithinterp._errors import ArithInterpError


@dataclass(frozen=True, kw_only=True)
class GPT2Weights:
    """The weights of a GPT-2 model in transformer-lens layout (float32, detached)."""

    W_E: Float[Tensor, "d_vocab d_model"]
    W_pos: Float[Tensor, "n_ctx d_model"]
    ln1_w: Float[Tensor, "layer d_model"]
    ln1_b: Float[Tensor, "layer d_model"]
    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer head d_model d_head"]
    W_V: Float[Tensor, "layer head d_model d_head"]
    b_Q: Float[Tensor, "layer head d_head"]
    b_K: Float[Tensor, "layer head d_head"]
    b_V: Float[Tensor, "layer head d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_O: Float[Tensor, "layer d_model"]
    ln2_w: Float[Tensor, "layer d_model"]
    ln2_b: Float[Tensor, "layer d_model"]
    W_in: Float[Tensor, "layer d_model d_mlp"]
    b_in: Float[Tensor, "layer d_mlp"]
    W_out: Float[Tensor, "layer d_mlp d_model"]
    b_out: Float[Tensor, "layer d_model"]
    lnf_w: Float[Tensor, " d_model"]
    lnf_b: Float[Tensor, " d_model"]
    W_U: Float[Tensor, "d_model d_vocab"]
    eps: float
    act: str

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[3]


def hf_model(model):
    """The Hugging Face model inside a `TransformerBridge` (or `model` itself if it is one)."""
    return getattr(model, "original_model", model)


def supports(model) -> bool:
    """True if `model` is a GPT-2-architecture model this module can run exactly."""
    hf = hf_model(model)
    cfg = getattr(hf, "config", None)
    return (
        cfg is not None
        and getattr(cfg, "model_type", None) == "gpt2"
        and not getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
        and not getattr(cfg, "reorder_and_upcast_attn", False)
        and getattr(cfg, "scale_attn_weights", True)
        and getattr(cfg, "activation_function", "gelu_new") in _ACTS
    )


def extract_weights(model) -> GPT2Weights:
    """Read a GPT-2 model's weights (from a bridge or a `GPT2LMHeadModel`) into transformer-lens layout."""
    if not supports(model):
        raise ArithInterpError(
            "the fast patching engine implements the GPT-2 architecture only; "
            "pass engine='transformer-lens' for this model."
        )
    hf = hf_model(model)
    cfg = hf.config
    t = hf.transformer
    n_heads, d_model = cfg.n_head, cfg.n_embd
    d_head = d_model // n_heads

    def stack(fn):
        return torch.stack([fn(block) for block in t.h]).detach().float()

    def qkv(block, i):  # Conv1D: y = x @ W + b, W is [d_model, 3 * d_model]
        w = block.attn.c_attn.weight[:, i * d_model : (i + 1) * d_model]
        return w.reshape(d_model, n_heads, d_head).permute(1, 0, 2)  # (head, d_model, d_head)

    def qkv_b(block, i):
        return block.attn.c_attn.bias[i * d_model : (i + 1) * d_model].reshape(n_heads, d_head)

    return GPT2Weights(
        W_E=t.wte.weight.detach().float(),
        W_pos=t.wpe.weight.detach().float(),
        ln1_w=stack(lambda b: b.ln_1.weight),
        ln1_b=stack(lambda b: b.ln_1.bias),
        W_Q=stack(lambda b: qkv(b, 0)),
        W_K=stack(lambda b: qkv(b, 1)),
        W_V=stack(lambda b: qkv(b, 2)),
        b_Q=stack(lambda b: qkv_b(b, 0)),
        b_K=stack(lambda b: qkv_b(b, 1)),
        b_V=stack(lambda b: qkv_b(b, 2)),
        W_O=stack(lambda b: b.attn.c_proj.weight.reshape(n_heads, d_head, d_model)),
        b_O=stack(lambda b: b.attn.c_proj.bias),
        ln2_w=stack(lambda b: b.ln_2.weight),
        ln2_b=stack(lambda b: b.ln_2.bias),
        W_in=stack(lambda b: b.mlp.c_fc.weight),
        b_in=stack(lambda b: b.mlp.c_fc.bias),
        W_out=stack(lambda b: b.mlp.c_proj.weight),
        b_out=stack(lambda b: b.mlp.c_proj.bias),
        lnf_w=t.ln_f.weight.detach().float(),
        lnf_b=t.ln_f.bias.detach().float(),
        W_U=hf.lm_head.weight.detach().float().T,
        eps=float(cfg.layer_norm_epsilon),
        act=cfg.activation_function,
    )


_ACTS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh GELU, as torch's fused kernel
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


def layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


@dataclass
class Cache:
    """Activations of one full run, `[batch, pos, ...]` per layer (lists indexed by layer)."""

    resid_pre: list[Tensor]  # [batch, pos, d_model]
    resid_mid: list[Tensor]
    resid_post: list[Tensor]
    q: list[Tensor]  # [batch, pos, head, d_head]
    k: list[Tensor]
    v: list[Tensor]
    pattern: list[Tensor]  # [batch, head, q_pos, k_pos]
    z: list[Tensor]  # [batch, pos, head, d_head]
    attn_out: list[Tensor]  # [batch, pos, d_model]
    mlp_post: list[Tensor]  # [batch, pos, d_mlp]
    mlp_out: list[Tensor]
    final: Tensor  # [batch, pos, d_model] residual after the last block (before ln_f)


def attention(
    w: GPT2Weights,
    layer: int,
    q: Float[Tensor, "... q_pos head d_head"],
    k: Float[Tensor, "... k_pos head d_head"],
    v: Float[Tensor, "... k_pos head d_head"],
    q_offset: int = 0,
) -> tuple[Float[Tensor, "... q_pos head d_head"], Float[Tensor, "... head q_pos k_pos"]]:
    """Causal attention of queries at positions `q_offset..` over keys at `0..`; returns (z, pattern)."""
    scores = torch.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(w.d_head)
    n_q, n_k = q.shape[-3], k.shape[-3]
    allowed = torch.arange(n_k)[None, :] <= (torch.arange(n_q)[:, None] + q_offset)  # (q_pos, k_pos)
    scores = scores.masked_fill(~allowed, float("-inf"))
    pattern = scores.softmax(-1)
    z = torch.einsum("...hqk,...khd->...qhd", pattern, v)
    return z, pattern


def qkv(w: GPT2Weights, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values `[..., pos, head, d_head]` from the residual `x` `[..., pos, d_model]`."""
    h = layer_norm(x, w.ln1_w[layer], w.ln1_b[layer], w.eps)
    q = torch.einsum("...pm,hmd->...phd", h, w.W_Q[layer]) + w.b_Q[layer]
    k = torch.einsum("...pm,hmd->...phd", h, w.W_K[layer]) + w.b_K[layer]
    v = torch.einsum("...pm,hmd->...phd", h, w.W_V[layer]) + w.b_V[layer]
    return q, k, v


def embed(w: GPT2Weights, tokens: Tensor) -> Tensor:
    """Token plus position embedding `[..., pos, d_model]` of `tokens` `[..., pos]`."""
    return w.W_E[tokens] + w.W_pos[: tokens.shape[-1]]


def z_to_out(w: GPT2Weights, layer: int, z: Tensor) -> Tensor:
    """Attention output `[..., pos, d_model]` from `z` `[..., pos, head, d_head]` (sum over heads + bias)."""
    return torch.einsum("...phd,hdm->...pm", z, w.W_O[layer]) + w.b_O[layer]


def mlp(w: GPT2Weights, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(post-activation `[..., d_mlp]`, output `[..., d_model]`) of the MLP on residual `x`."""
    h = layer_norm(x, w.ln2_w[layer], w.ln2_b[layer], w.eps)
    post = _ACTS[w.act](h @ w.W_in[layer] + w.b_in[layer])
    return post, post @ w.W_out[layer] + w.b_out[layer]


@torch.no_grad()
def run_with_cache(w: GPT2Weights, tokens: Int[Tensor, "batch pos"]) -> Cache:
    """One full forward pass, keeping every activation the patching engine can reuse."""
    x = embed(w, tokens)
    c = Cache(*[[] for _ in range(11)], final=None)  # type: ignore[arg-type]
    for layer in range(w.n_layers):
        c.resid_pre.append(x)
        q, k, v = qkv(w, layer, x)
        z, pattern = attention(w, layer, q, k, v)
        attn_out = z_to_out(w, layer, z)
        x = x + attn_out
        c.resid_mid.append(x)
        post, mlp_out = mlp(w, layer, x)
        x = x + mlp_out
        kept = {"q": q, "k": k, "v": v, "pattern": pattern, "z": z, "attn_out": attn_out, "mlp_post": post,
                "mlp_out": mlp_out, "resid_post": x}  # fmt: skip
        for name, value in kept.items():
            getattr(c, name).append(value)
    c.final = x
    return c


def unembed(w: GPT2Weights, x: Tensor, columns: Tensor | None = None) -> Tensor:
    """Logits `[..., d_vocab]` (or `[..., len(columns)]`) from the final residual `x`."""
    h = layer_norm(x, w.lnf_w, w.lnf_b, w.eps)
    return h @ (w.W_U if columns is None else w.W_U[:, columns])


def run_suffix(
    w: GPT2Weights,
    cache: Cache,
    start_layer: int,
    start_pos: int,
    resid: Float[Tensor, "patch batch suffix d_model"],
    *,
    stage: str = "pre",
    final_only: bool = False,
) -> Float[Tensor, "patch batch suffix d_model"]:
    """Continue a run from layer `start_layer` for positions `start_pos..` only.

    `resid` is the (patched) residual of the suffix positions at `stage` of `start_layer`: "pre" (before the
    block), "mid" (after attention, before the MLP) or "post" (after the block). Keys and values of positions
    before `start_pos` are read from `cache` (they are unchanged by any patch at `start_pos` or later).
    Returns the final residual (before `ln_f`) of the suffix positions; with `final_only` the last block
    computes only the final position (its query, attention output and MLP), so the suffix axis has length 1
    whenever a block runs (read the result with `[..., -1, :]` either way).
    """
    first, x = start_layer, resid
    if stage == "mid":
        if final_only and first == w.n_layers - 1:
            x = x[..., -1:, :]
        x = x + mlp(w, first, x)[1]
        first += 1
    elif stage == "post":
        first += 1
    for layer in range(first, w.n_layers):
        x = block_suffix(w, cache, layer, start_pos, x, final_only=final_only and layer == w.n_layers - 1)
    return x


def block_suffix(
    w: GPT2Weights, cache: Cache, layer: int, start_pos: int, x: Tensor, *, final_only: bool = False
) -> Tensor:
    """One block for suffix positions `start_pos..` given the residual there; earlier K/V from `cache`.

    With `final_only` only the last position's query, attention output and MLP are computed (the keys and
    values of every suffix position still are) and the result has one position.
    """
    q, k, v = qkv(w, layer, x)  # (patch, batch, suffix, head, d_head)
    if start_pos > 0:
        shape = (*x.shape[:-2], start_pos, *k.shape[-2:])
        k = torch.cat([cache.k[layer][:, :start_pos].expand(shape), k], dim=-3)
        v = torch.cat([cache.v[layer][:, :start_pos].expand(shape), v], dim=-3)
    offset = start_pos
    if final_only:
        offset = start_pos + x.shape[-2] - 1
        q, x = q[..., -1:, :, :], x[..., -1:, :]
    z, _ = attention(w, layer, q, k, v, offset)
    x = x + z_to_out(w, layer, z)
    return x + mlp(w, layer, x)[1]


def head_qkv(
    w: GPT2Weights, layer: int, which: str, head: int, x: Float[Tensor, "... pos d_model"]
) -> Float[Tensor, "... pos d_head"]:
    """One head's query, key or value (`which` = "q", "k", "v") computed from its own residual input `x`."""
    h = layer_norm(x, w.ln1_w[layer], w.ln1_b[layer], w.eps)
    W, b = {"q": (w.W_Q, w.b_Q), "k": (w.W_K, w.b_K), "v": (w.W_V, w.b_V)}[which]
    return h @ W[layer, head] + b[layer, head]


def block_edges(
    w: GPT2Weights,
    layer: int,
    x: Float[Tensor, "... pos d_model"],
    *,
    head_in: dict[tuple[str, int], Tensor] | None = None,
    mlp_in: Tensor | None = None,
) -> Float[Tensor, "... pos d_model"]:
    """One block over all positions where chosen inputs see an extra additive term (path patching).

    `head_in[(which, head)]` (`[..., pos, d_model]`) is added to the residual that head `head` reads for its
    query, key or value only (its layer norm is recomputed on the sum); `mlp_in` is added to the MLP's input
    only. Every other reader sees the unmodified residual, so the extra term travels along exactly those edges.
    Returns the residual after the block.
    """
    q, k, v = qkv(w, layer, x)  # (..., pos, head, d_head)
    if head_in:
        q, k, v = q.clone(), k.clone(), v.clone()
        parts = {"q": q, "k": k, "v": v}
        for (which, head), delta in head_in.items():
            parts[which][..., head, :] = head_qkv(w, layer, which, head, x + delta)
    z, _ = attention(w, layer, q, k, v)
    mid = x + z_to_out(w, layer, z)
    return mid + mlp(w, layer, mid if mlp_in is None else mid + mlp_in)[1]
