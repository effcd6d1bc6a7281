"""The ablation engine: the batched functional pass equals the hooked bridge, and ablation means what it says."""

from __future__ import annotations

import pytest
import torch

from arithinterp.ablation import ABLATIONS, POSITIONS, run_ablations
from arithinterp.patching import all_components
from arithinterp.tasks import make_dataset


def test_fast_engine_matches_bridge_hooks(tiny_model):
    """The batched functional engine gives the hooked bridge's numbers for every ablation and position mode."""
    ds = make_dataset(tiny_model.tokenizer, task="add", n=8, seed=4)
    ref = make_dataset(tiny_model.tokenizer, task="add", n=7, seed=9)
    comps = all_components(3, 4)
    g = torch.Generator().manual_seed(1)
    sets = [[comps[i] for i in torch.randperm(len(comps), generator=g)[:k].tolist()] for k in (0, 2, 6, 15)]
    for ablation in ABLATIONS:
        for positions in POSITIONS:
            kw = dict(ablation=ablation, positions=positions, reference=ref, metric="logit_diff")
            fast = run_ablations(tiny_model, ds, sets, engine="fast", batch_size=3, **kw)
            hooks = run_ablations(tiny_model, ds, sets, engine="hooks", **kw)
            assert (fast.values - hooks.values).abs().max() < 1e-5, (ablation, positions)
            assert torch.equal(fast.correct, hooks.correct)
            assert torch.allclose(fast.full, hooks.full, atol=1e-5)
            assert torch.allclose(fast.values[0], fast.full, atol=1e-5)  # ablating nothing = the full model
            assert (fast.values[-1] - fast.values[0]).abs().max() > 1e-3  # ablating everything changes something


def test_zero_ablating_everything_leaves_embeddings_and_biases(tiny_model):
    """On paper: with every head's z and every MLP's output zeroed, the final residual is the embedding plus the
    attention output biases b_O, so the logits are ln_f of that, unembedded."""
    from arithinterp import _gpt2

    ds = make_dataset(tiny_model.tokenizer, task="add", n=6, seed=2)
    runs = run_ablations(tiny_model, ds, [all_components(3, 4)], ablation="zero", metric="answer_logit")
    w = _gpt2.extract_weights(tiny_model)
    x = w.W_E[ds.clean_tokens[:, -1]] + w.W_pos[ds.clean_tokens.shape[1] - 1] + w.b_O.sum(0)
    expected = _gpt2.unembed(w, x)[torch.arange(len(ds)), ds.answer_ids]
    assert torch.allclose(runs.values[0], expected, atol=1e-5)


def test_bad_options(tiny_model):
    from arithinterp import ArithInterpError

    ds = make_dataset(tiny_model.tokenizer, task="add", n=4)
    with pytest.raises(ArithInterpError, match="ablation"):
        run_ablations(tiny_model, ds, [[]], ablation="noise")
    with pytest.raises(ArithInterpError, match="not in this model"):
        run_ablations(tiny_model, ds, [["L7H0"]])
    other = make_dataset(tiny_model.tokenizer, task="add", n=4, digits=2)
    with pytest.raises(ArithInterpError, match="reference"):
        run_ablations(tiny_model, ds, [["L0H0"]], reference=other)
