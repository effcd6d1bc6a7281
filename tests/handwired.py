"""Hand-wired GPT-2 models whose circuits are known on paper.

`copy_head_model(layer, head)`: on prompts "<bos>a+b=" (one-digit operands, the built-in char tokenizer) the
single head `L{layer}H{head}` attends from every position to position 1 (the operand `a`) and writes a's digit
into a dedicated "answer" subspace of the residual stream; the unembedding reads the digit from there. Every
other head and every MLP writes exactly zero. So the model outputs `a`, only that head matters, and with an
operand counterfactual, patching that head's output at the final position restores the clean logits exactly
(normalised score 1) while every other component scores exactly 0.

Residual layout (d_model = 128): dims 0..51 token one-hot, 64..79 position one-hot, 100..109 answer digit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from arithinterp.tokenizer import VOCAB, build_char_tokenizer

D_MODEL, POS0, ANS0 = 128, 64, 100
DIGIT_IDS = [VOCAB.index(str(d)) for d in range(10)]


def _blank_model(n_layer: int, n_head: int) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=len(VOCAB), n_positions=16, n_embd=D_MODEL, n_layer=n_layer, n_head=n_head, n_inner=4 * D_MODEL,
        tie_word_embeddings=False, bos_token_id=VOCAB.index("<bos>"), eos_token_id=VOCAB.index("<eos>"),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        t = model.transformer
        for ln in [t.ln_f] + [b.ln_1 for b in t.h] + [b.ln_2 for b in t.h]:
            ln.weight.fill_(1.0)
        t.wte.weight[torch.arange(len(VOCAB)), torch.arange(len(VOCAB))] = 1.0
        t.wpe.weight[torch.arange(16), POS0 + torch.arange(16)] = 1.0
        for d, tok in enumerate(DIGIT_IDS):
            model.lm_head.weight[tok, ANS0 + d] = 10.0
    return model


def copy_head_model(layer: int = 1, head: int = 2, n_layer: int = 2, n_head: int = 4) -> GPT2LMHeadModel:
    """The model described in the module docstring."""
    model = _blank_model(n_layer, n_head)
    d_head = D_MODEL // n_head
    attn = model.transformer.h[layer].attn
    q0, k0, v0 = 0, D_MODEL, 2 * D_MODEL  # column offsets of q, k, v in c_attn (Conv1D: x @ W)
    col = head * d_head
    with torch.no_grad():
        attn.c_attn.bias[q0 + col] = 1.0  # constant query ...
        attn.c_attn.weight[POS0 + 1, k0 + col] = 200.0  # ... matches only the key at position 1
        for d, tok in enumerate(DIGIT_IDS):
            attn.c_attn.weight[tok, v0 + col + d] = 1.0  # value = a's digit, one-hot in the head's dims
            attn.c_proj.weight[col + d, ANS0 + d] = 30.0  # written into the answer subspace
    return model


def save(model: GPT2LMHeadModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# A planted two-head serial circuit among active distractors (for localization: arithinterp.localize)

RELAY0, JUNK0 = 80, 112  # dims 80..89 carry a's digit from L0 to L1; dims 112..121 are read by nothing


def _head_slices(model: GPT2LMHeadModel, layer: int, head: int):
    d_head = D_MODEL // model.config.n_head
    attn = model.transformer.h[layer].attn
    return attn, head * d_head


def _attend_to(model: GPT2LMHeadModel, layer: int, head: int, pos: int) -> None:
    """Make the head attend (from every position that can see it) to position `pos`."""
    attn, col = _head_slices(model, layer, head)
    attn.c_attn.bias[col] = 1.0  # constant query in the head's first dim ...
    attn.c_attn.weight[POS0 + pos, D_MODEL + col] = 200.0  # ... matches only the key at `pos`


def _copy(model: GPT2LMHeadModel, layer: int, head: int, src: list[int], dst: int, gain: float) -> None:
    """Value = the (layer-normed) residual dims `src` (one per digit); output -> dims dst.. with `gain`."""
    attn, col = _head_slices(model, layer, head)
    for d, s in enumerate(src):
        attn.c_attn.weight[s, 2 * D_MODEL + col + d] = 1.0
        attn.c_proj.weight[col + d, dst + d] = gain


def serial_circuit_model() -> GPT2LMHeadModel:
    """Two layers, four heads. The planted circuit is L0H1 -> L1H2; the other components are active but irrelevant.

    On prompts "<bos>a+b=" (positions 0..4):

    * L0H1 attends to position 1 and writes a's digit into the relay dims 80..89 (at every position);
    * L1H2 attends to the final position itself and copies the relay dims into the answer subspace, which the
      unembedding reads: the model outputs a.

    Both are necessary (the answer reaches the logits only through L0H1 -> L1H2) and both restore the clean
    answer when patched at the final position. Distractors write operand digits into junk dims 112..121 that
    nothing reads: L0H3 copies b (position 3), L1H0 copies a, and MLP0 reads the relay dims and writes to junk.
    Their outputs change with the prompt, so ablating them perturbs the layer norms' scale slightly (a one-hot
    digit's mean and spread do not depend on which digit it is, so patching them changes nothing), and every
    other head and MLP1 write exactly zero. Planted set: {L0H1, L1H2}.
    """
    model = _blank_model(2, 4)
    digits = DIGIT_IDS
    with torch.no_grad():
        _attend_to(model, 0, 1, 1)
        _copy(model, 0, 1, digits, RELAY0, 0.25)
        _attend_to(model, 1, 2, 4)
        _copy(model, 1, 2, [RELAY0 + d for d in range(10)], ANS0, 30.0)
        _attend_to(model, 0, 3, 3)
        _copy(model, 0, 3, digits, JUNK0, 0.04)
        _attend_to(model, 1, 0, 1)
        _copy(model, 1, 0, digits, JUNK0, 0.04)
        mlp = model.transformer.h[0].mlp
        for d in range(10):
            mlp.c_fc.weight[RELAY0 + d, d] = 1.0
            mlp.c_proj.weight[d, JUNK0 + d] = 0.03
    return model


def operand_a_dataset(tokenizer, n: int = 40, seed: int = 0):
    """One-digit "a+b=" prompts scored on the digit a (what the copy models output), counterfactual a' != a."""
    import dataclasses

    from arithinterp.tasks import make_dataset

    ds = make_dataset(tokenizer, task="add", n=n, digits=1, seed=seed)
    digit = lambda d: tokenizer.convert_tokens_to_ids(str(d))  # noqa: E731
    ds = dataclasses.replace(
        ds,
        answer_ids=torch.tensor([digit(e.meta["a"]) for e in ds.examples]),
        counterfactual_ids=torch.tensor([digit(e.meta["counterfactual"]["a"]) for e in ds.examples]),
    )
    return ds.subset((ds.answer_ids != ds.counterfactual_ids).nonzero()[:, 0])


# ---------------------------------------------------------------------------------------------------------
# A planted path for path patching (arithinterp.path_patching)


def planted_path_model() -> GPT2LMHeadModel:
    """Two layers, four heads, one path from operand a to the answer: L0H1 -> L1H2.v -> logits.

    On prompts "<bos>a+b=" (positions 0..4):

    * L0H1 attends to position 1 and writes a's digit into the relay dims 80..89 at every position;
    * L1H2 attends to position 2 (the "+", not the final position) and copies the relay dims found there into
      the answer subspace, which the unembedding reads: the model outputs a.

    So the only path that carries a to the logits is L0H1 -> (value input of L1H2) -> logits. Exact path
    patching gives 1 for the edges L0H1 -> L1H2.v and L1H2 -> logits and 0 for every other edge, including
    edges that exist but carry nothing the logits read: L0H1 -> L1H0.v (L1H0 copies the relay dims at the
    final position into junk dims 112..121) and L0H1 -> MLP0 (MLP0 reads the relay dims and writes junk).
    L0H3 copies b into junk. Activation patching tells the path apart from its parts only partly: L0H1's
    output matters at position 2 (and at all positions at once) but not at the final position.
    """
    model = _blank_model(2, 4)
    relay = [RELAY0 + d for d in range(10)]
    with torch.no_grad():
        _attend_to(model, 0, 1, 1)
        _copy(model, 0, 1, DIGIT_IDS, RELAY0, 0.25)
        _attend_to(model, 1, 2, 2)
        _copy(model, 1, 2, relay, ANS0, 30.0)
        _attend_to(model, 1, 0, 4)
        _copy(model, 1, 0, relay, JUNK0, 0.04)
        _attend_to(model, 0, 3, 3)
        _copy(model, 0, 3, DIGIT_IDS, JUNK0, 0.04)
        mlp = model.transformer.h[0].mlp
        for d in range(10):
            mlp.c_fc.weight[RELAY0 + d, d] = 1.0
            mlp.c_proj.weight[d, JUNK0 + d] = 0.03
    return model
