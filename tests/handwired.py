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
