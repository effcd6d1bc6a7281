"""Final-position head/MLP activation patching (the `arithinterp patch` default): parity and truth."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from arithinterp import _gpt2
from arithinterp.models import load
from arithinterp.patching import Component, patch_components
from arithinterp.tasks import make_dataset


def test_functional_forward_matches_bridge(tiny_model):
    ds = make_dataset(tiny_model.tokenizer, task="add", n=8)
    w = _gpt2.extract_weights(tiny_model)
    cache = _gpt2.run_with_cache(w, ds.clean_tokens)
    with torch.no_grad():
        ref = tiny_model(ds.clean_tokens)
    assert torch.allclose(_gpt2.unembed(w, cache.final), ref, atol=1e-4)


@pytest.mark.parametrize("metric", ["logit_diff", "answer_logit", "kl", "accuracy"])
def test_fast_engine_matches_transformer_lens(tiny_model, metric):
    ds = make_dataset(tiny_model.tokenizer, task="add", n=12, seed=5)
    fast = patch_components(tiny_model, ds, metric=metric, engine="fast", progress=False)
    ref = patch_components(tiny_model, ds, metric=metric, engine="transformer-lens", progress=False)
    assert torch.allclose(fast.patched, ref.patched, atol=1e-5)
    assert torch.allclose(fast.clean, ref.clean, atol=1e-5)
    assert torch.allclose(fast.corrupted, ref.corrupted, atol=1e-5)
    if metric in ("logit_diff", "answer_logit"):
        assert torch.allclose(fast.scores, ref.scores, atol=1e-4)
    # kl and accuracy: on a random model the clean-vs-corrupted gap is tiny (or zero), so the normalised
    # score amplifies float32 rounding; the raw per-example values above are the meaningful comparison.


def test_gpt2_tokenizer_model_parity(gpt2_tiny_dir):
    model = load(str(gpt2_tiny_dir))
    ds = make_dataset(model.tokenizer, task="add", n=16, style="equation")
    fast = patch_components(model, ds, engine="fast", progress=False)
    ref = patch_components(model, ds, engine="transformer-lens", progress=False)
    assert (fast.scores - ref.scores).abs().max() < 1e-4


def test_planted_copy_head_is_the_only_component(copy_head_dir, char_tokenizer):
    """L1H2 copies operand a: patching it restores the clean run exactly; everything else does nothing."""
    model = load(str(copy_head_dir))
    ds = make_dataset(char_tokenizer, task="add", n=30, digits=1)
    digit = lambda d: char_tokenizer.convert_tokens_to_ids(str(d))  # noqa: E731
    ds = dataclasses.replace(
        ds,
        answer_ids=torch.tensor([digit(e.meta["a"]) for e in ds.examples]),
        counterfactual_ids=torch.tensor([digit(e.meta["counterfactual"]["a"]) for e in ds.examples]),
    )
    keep = (ds.answer_ids != ds.counterfactual_ids).nonzero()[:, 0]
    ds = ds.subset(keep)
    for engine in ("fast", "transformer-lens"):
        res = patch_components(model, ds, engine=engine, progress=False)
        scores = {c.name: float(s) for c, s in zip(res.components, res.scores)}
        assert scores.pop("L1H2") == pytest.approx(1.0, abs=1e-4)
        assert max(abs(s) for s in scores.values()) < 1e-4
        assert res.ranked()[0]["name"] == "L1H2"
        assert (res.clean.mean() - res.corrupted.mean()) > 1.0  # the model really separates the answers


def test_out_of_range_component(tiny_model):
    from arithinterp import ArithInterpError

    ds = make_dataset(tiny_model.tokenizer, task="add", n=4)
    with pytest.raises(ArithInterpError, match="layer 7 is out of range"):
        patch_components(tiny_model, ds, components=[Component(kind="mlp", layer=7)], progress=False)
    with pytest.raises(ArithInterpError, match="not a head"):
        Component.parse("head3")
