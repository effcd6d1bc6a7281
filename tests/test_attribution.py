"""Direct logit attribution, logit lens, residual decomposition: tested against exact sums and planted circuits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_random_gpt2
from handwired import copy_head_model, operand_a_dataset, save, serial_circuit_model

from arithinterp import _gpt2
from arithinterp._errors import ArithInterpError
from arithinterp.attribution import (
    decompose_residual,
    direct_logit_attribution,
    effective_unembed,
    logit_lens,
    mean_ci,
    rank_agreement,
    spearman,
)
from arithinterp.models import load
from arithinterp.tasks import make_dataset


@pytest.fixture(scope="module")
def rough_model(tmp_path_factory, char_tokenizer):
    """A random GPT-2 whose layer norms have non-trivial weights and biases and whose residual has a large
    mean, so that forgetting the centring, the LN bias or the cached scale would break the sums."""
    from transformers import GPT2LMHeadModel

    folder = build_random_gpt2(tmp_path_factory.mktemp("rough"), char_tokenizer, d_model=64, seed=3)
    hf = GPT2LMHeadModel.from_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(8.0)
        hf.transformer.wte.weight.add_(1.5)  # a large common mean across d_model
    hf.save_pretrained(folder)
    return load(str(folder))


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory):
    return load(str(save(copy_head_model(layer=1, head=2), tmp_path_factory.mktemp("copy5"))))


@pytest.fixture(scope="module")
def serial_model(tmp_path_factory):
    return load(str(save(serial_circuit_model(), tmp_path_factory.mktemp("serial5"))))


def test_decomposition_sums_to_the_cached_final_residual(rough_model):
    ds = make_dataset(rough_model.tokenizer, n=24)
    d = decompose_residual(rough_model, ds.clean_tokens, neurons=True)
    _, cache = rough_model.run_with_cache(ds.clean_tokens)
    final = cache["ln_final.hook_in"][:, -1]
    assert torch.allclose(d.stack.sum(0), final, atol=1e-4)
    assert torch.allclose(d.final, final)
    assert torch.allclose(d.scale, (final.var(-1, unbiased=False) + 1e-5).sqrt(), rtol=1e-5)
    assert d.stages.shape[0] == 1 + 2 * rough_model.cfg.n_layers
    assert torch.allclose(d.stages[-1], final)
    assert d.names[:3] == ["embed", "pos_embed", "L0H0"] and d.names[-1] == "MLP2"


def test_dla_adds_up_to_the_logit_and_logit_difference(rough_model):
    """The truth test: all parts (with ln_final.b) add up to the model's answer logit and logit difference."""
    ds = make_dataset(rough_model.tokenizer, n=32)
    digits = torch.tensor([rough_model.tokenizer.convert_tokens_to_ids(str(i)) for i in range(10)])
    r = direct_logit_attribution(rough_model, ds, token_set=digits)
    logits = rough_model(ds.clean_tokens)[:, -1].detach()
    b = torch.arange(len(ds))
    assert (r.answer_logit.sum(0) - logits[b, ds.answer_ids]).abs().max() < 1e-4
    want_diff = logits[b, ds.answer_ids] - logits[b, ds.counterfactual_ids]
    assert (r.logit_diff.sum(0) - want_diff).abs().max() < 1e-4
    assert (r.token_set.sum(0) - logits[:, digits]).abs().max() < 1e-4
    assert max(r.max_sum_error().values()) < 1e-4
    assert logits[b, ds.answer_ids].abs().mean() > 1.0  # the logits are not trivially small
    # the same sum without the centring is far off: the test can fail
    w = _gpt2.extract_weights(rough_model)
    d = decompose_residual(rough_model, ds.clean_tokens)
    uncentred = torch.einsum("cbm,mb->b", d.stack, w.lnf_w[:, None] * w.W_U[:, ds.answer_ids]) / d.scale
    assert (uncentred + w.lnf_b @ w.W_U[:, ds.answer_ids] - logits[b, ds.answer_ids]).abs().max() > 1e-2


def test_effective_unembed_is_centred(rough_model):
    w = _gpt2.extract_weights(rough_model)
    eff = effective_unembed(w, torch.arange(5))
    assert eff.mean(0).abs().max() < 1e-6


def test_neurons_add_up_to_their_mlp(rough_model):
    ds = make_dataset(rough_model.tokenizer, n=16)
    r = direct_logit_attribution(rough_model, ds, neurons=True)
    w = _gpt2.extract_weights(rough_model)
    d = decompose_residual(rough_model, ds.clean_tokens)
    b = torch.arange(len(ds))
    for layer in range(w.n_layers):
        bias = (w.b_out[layer] @ effective_unembed(w, ds.answer_ids))[b] / d.scale  # the MLP's output bias
        mlp = r.answer_logit[r.names.index(f"MLP{layer}")]
        assert (r.neurons.answer_logit[layer].sum(-1) + bias - mlp).abs().max() < 1e-4
    top = r.neurons.top(5)
    assert len(top) == 5 and top[0]["name"].startswith("L") and "N" in top[0]["name"]
    assert abs(top[0]["mean"]) >= abs(top[-1]["mean"])


def test_copy_head_writes_the_whole_logit_difference(copy_model):
    """Planted: only L1H2 writes the answer, so its DLA is the whole logit difference, on paper

    10 (unembedding gain) * 30 (head gain) * (v_a - v_c) / s,   v_a - v_c = 1 / s1,

    where the value reads the layer-normed residual at position 1 (two one-hot ones in 128 dims: scale s1) and
    s is the final layer norm's scale."""
    ds = operand_a_dataset(copy_model.tokenizer, n=30)
    r = direct_logit_attribution(copy_model, ds)
    d = decompose_residual(copy_model, ds.clean_tokens)
    head = r.names.index("L1H2")
    s1 = (2 / 128 - (2 / 128) ** 2 + 1e-5) ** 0.5
    assert torch.allclose(r.logit_diff[head], 300.0 / (s1 * d.scale), rtol=1e-4)
    assert torch.allclose(r.logit_diff[head], r.logit_diff_total, atol=1e-4)
    others = torch.cat([r.logit_diff[:head], r.logit_diff[head + 1 :]])
    assert others.abs().max() < 1e-4
    assert r.ranked()[0]["name"] == "L1H2"
    grid = r.head_grid(2, 4)
    assert grid.flatten().abs().argmax() == 1 * 4 + 2


def test_dla_sees_direct_effects_only(serial_model):
    """Planted serial circuit L0H1 -> L1H2: L0H1 matters (patching) but writes nothing the unembedding reads."""
    from arithinterp.patching import patch_components

    ds = operand_a_dataset(serial_model.tokenizer, n=30)
    r = direct_logit_attribution(serial_model, ds)
    means = r.component_means()
    assert means["L1H2"] > 1.0
    assert abs(means["L0H1"]) < 1e-4  # relay dims are not read by the unembedding
    patch = patch_components(serial_model, ds, progress=False)
    agree = rank_agreement(r, patch)
    assert agree["dla_top"][0] == "L1H2" and "L0H1" in agree["patching_top"][:2]
    assert -1.0 <= agree["signed"] <= 1.0 and agree["n_components"] == 10


def test_logit_lens_on_the_copy_head(copy_model):
    """The answer appears exactly when L1H2 has written it (after attn1) and not before."""
    ds = operand_a_dataset(copy_model.tokenizer, n=20)
    lens = logit_lens(copy_model, ds)
    assert lens.stage_names == ["embed", "attn0", "mlp0", "attn1", "mlp1"]
    top1 = [s["top1"] for s in lens.summary()]
    assert top1 == [0.0, 0.0, 0.0, 1.0, 1.0]
    logits = copy_model(ds.clean_tokens)[:, -1].detach()
    p = logits.softmax(-1)[torch.arange(len(ds)), ds.answer_ids]
    assert torch.allclose(lens.prob[-1], p, atol=1e-6)


def test_logit_lens_last_stage_is_the_model(rough_model):
    ds = make_dataset(rough_model.tokenizer, n=16)
    lens = logit_lens(rough_model, ds)
    logits = rough_model(ds.clean_tokens)[:, -1].detach()
    b = torch.arange(len(ds))
    rank = (logits > logits[b, ds.answer_ids][:, None]).sum(-1)
    assert torch.equal(lens.rank[-1], rank)
    assert torch.allclose(lens.logit_diff[-1], logits[b, ds.answer_ids] - logits[b, ds.counterfactual_ids], atol=1e-4)


def test_gpt2_tokenizer_model_sums_exactly(gpt2_tiny_dir):
    model = load(str(gpt2_tiny_dir))
    ds = make_dataset(model.tokenizer, n=12, operand_range=(1, 40))
    r = direct_logit_attribution(model, ds)
    assert max(r.max_sum_error().values()) < 1e-4
    lens = logit_lens(model, ds)
    assert lens.rank.shape == (5, len(ds))


def test_spearman_against_values_on_paper():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    # ties take their average rank: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) -> 0.9486832980505138
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(0.9486833, abs=1e-6)


def test_mean_ci_brackets_the_mean():
    v = torch.stack([torch.randn(200) + 3.0, torch.full((200,), 2.0)])
    mean, lo, hi = mean_ci(v)
    assert lo[0] < mean[0] < hi[0] and 2.5 < mean[0] < 3.5 and hi[0] - lo[0] < 0.6
    assert lo[1] == mean[1] == hi[1] == 2.0


def test_cli_attribute_writes_json_and_html(tiny_model_dir, tmp_path, capsys):
    from arithinterp.cli import main

    out = tmp_path / "att"
    rc = main(["attribute", "--model", str(tiny_model_dir), "--n", "20", "--fourier", "--filter", "mlp:low",
               "--compare-patching", "--out", str(out)])  # fmt: skip
    assert rc == 0
    rec = json.loads((out / "attribute.json").read_text())
    assert rec["method"] == "direct_logit_attribution" and rec["dla_metric"] == "logit_diff" and rec["n"] == 20
    assert max(rec["sum_check"].values()) < 1e-4
    names = [c["name"] for c in rec["components"]]
    assert {"L0H0", "MLP2", "embed", "ln_final.b"} <= set(names)
    assert abs(rec["components"][0]["mean"]) >= abs(rec["components"][-1]["mean"])
    assert [s["stage"] for s in rec["logit_lens"]][-1] == "mlp2"
    assert rec["fourier"]["numbers"]["n"] == 10 and len(rec["fourier"]["answer_digits"]) == 4
    assert [f["filter"] for f in rec["filters"]] == ["none", "mlp:low"]
    assert "signed" in rec["patching_agreement"] and len(rec["examples"]) == 20
    page = (out / "attribute.html").read_text()
    assert page.count("plotly-graph-div") >= 6
    assert "Spearman" in capsys.readouterr().out


def test_cli_attribute_bad_filter_is_one_line(tiny_model_dir, tmp_path, capsys):
    from arithinterp.cli import main

    rc = main(["attribute", "--model", str(tiny_model_dir), "--filter", "mlp:wobble", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "wobble" in err and len(err.splitlines()) == 1
    rc = main(["attribute", "--model", str(tiny_model_dir), "--n", "4", "--filter", "mlp9:low",
               "--out", str(tmp_path / "y")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert rc == 2 and err == "arithinterp: error: filter mlp9:low: layer 9 is out of range 0..2."


def test_attribute_reads_the_weights_once(copy_model, monkeypatch):
    """DLA, logit lens, spectra, every filter and activation patching share one copy of the weights."""
    from arithinterp.attribution import AttributeConfig, attribute

    calls = []
    extract = _gpt2.extract_weights
    monkeypatch.setattr(_gpt2, "extract_weights", lambda model: calls.append(1) or extract(model))
    ds = operand_a_dataset(copy_model.tokenizer, n=12)
    config = AttributeConfig(fourier=True, filters=("mlp:high", "attn1:k1-3"), neurons=True, compare_patching=True)
    report = attribute(copy_model, ds, config, progress=False)
    assert len(calls) == 1 and len(report.filters) == 3 and report.agreement is not None
    assert not hasattr(copy_model, "_arithinterp_w")  # the weights lent to patching are taken back


def test_attribute_refuses_a_filter_that_does_not_fit_before_any_forward_pass(copy_model, monkeypatch):
    from arithinterp.attribution import AttributeConfig, attribute

    def forward_pass(*args, **kwargs):
        raise AssertionError("a forward pass ran before the filters were checked")

    for name in ("run_with_cache", "run_with_hooks", "forward"):
        monkeypatch.setattr(copy_model, name, forward_pass)
    ds = operand_a_dataset(copy_model.tokenizer, n=4)
    with pytest.raises(ArithInterpError, match=r"band 'k50' has frequencies \[50\] outside 0..5 for n=10"):
        attribute(copy_model, ds, AttributeConfig(fourier=True, filters=("mlp:k50",)), progress=False)
    with pytest.raises(ArithInterpError, match="filter mlp7:low: layer 7 is out of range 0..1"):
        attribute(copy_model, ds, AttributeConfig(filters=("attn:p7", "mlp7:low")), progress=False)


def test_a_model_of_another_architecture_is_told_about_attribution_not_patching(tmp_path, char_tokenizer):
    from transformers import GPT2LMHeadModel

    from arithinterp.attribution import AttributeConfig, attribute
    from arithinterp.fourier import FourierFilter, embedding_spectrum, evaluate_filters, number_tokens

    folder = build_random_gpt2(tmp_path, char_tokenizer, n_layer=1)
    hf = GPT2LMHeadModel.from_pretrained(folder)
    hf.config.scale_attn_by_inverse_layer_idx = True  # a variant the GPT-2 weight code does not implement
    hf.save_pretrained(folder)
    model = load(str(folder))
    ds = make_dataset(model.tokenizer, n=4)
    with pytest.raises(ArithInterpError, match="^direct logit attribution is implemented for GPT-2-architecture"):
        attribute(model, ds, AttributeConfig(fourier=True, filters=("mlp:low",)), progress=False)
    numbers = number_tokens(model.tokenizer)
    mlp_low = FourierFilter.parse("mlp:low")
    for call in (lambda: embedding_spectrum(model), lambda: evaluate_filters(model, ds, [mlp_low]),
                 lambda: mlp_low.hooks(model, numbers)):  # fmt: skip
        with pytest.raises(ArithInterpError, match="^Fourier analysis over number tokens is implemented for GPT-2"):
            call()


def test_dla_heatmap_takes_the_ranking_its_caller_made(copy_model):
    from arithinterp import plots

    ds = operand_a_dataset(copy_model.tokenizer, n=12)
    r = direct_logit_attribution(copy_model, ds)
    fig = plots.dla_heatmap(r, 2, 4, title="t")
    assert plots.dla_heatmap(None, 2, 4, title="t", ranked=r.ranked()).to_json() == fig.to_json()
    assert fig.data[0].z[1][2] == pytest.approx(float(r.logit_diff[r.names.index("L1H2")].mean()))
