"""Shared fixtures: seeded generators, tiny models built in well under a second, the GPT-2 tokenizer."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tokenizer"


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker():
    """Under pytest-xdist each worker gets one thread: two workers x two threads on two cores spin-wait badly."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seeded():
    """Seed every generator before each test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def char_tokenizer():
    from arithinterp.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def build_random_gpt2(folder: Path, tokenizer, *, n_layer=3, n_head=4, d_model=64, vocab_size=None, seed=0):
    """Save a random-weight GPT-2 with `tokenizer` as a Hugging Face folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=d_model, vocab_size=vocab_size or len(tokenizer), n_positions=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, char_tokenizer) -> Path:
    """A 3-layer, 4-head, width-64 random GPT-2 with the built-in char tokenizer."""
    return build_random_gpt2(tmp_path_factory.mktemp("tiny"), char_tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from arithinterp.models import load

    return load(str(tiny_model_dir))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    if not (GPT2_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("the GPT-2 tokenizer (../shared/models/gpt2-tokenizer) is not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))


@pytest.fixture(scope="session")
def gpt2_tiny_dir(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A 2-layer, 4-head, width-64 random GPT-2 with the real GPT-2 tokenizer (vocab 50257)."""
    return build_random_gpt2(tmp_path_factory.mktemp("gpt2tiny"), gpt2_tokenizer, n_layer=2, d_model=64)


@pytest.fixture(scope="session")
def copy_head_dir(tmp_path_factory) -> Path:
    """The hand-wired model of tests/handwired.py: L1H2 copies operand a to the answer."""
    from handwired import copy_head_model, save

    return save(copy_head_model(layer=1, head=2), tmp_path_factory.mktemp("copyhead"))
