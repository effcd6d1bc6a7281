"""Activation patching at every granularity and in both directions: parity with transformer-lens and truth.

The random models here are built with a large initialiser range so that the clean and corrupted runs differ
clearly (a default-initialised random GPT-2 gives almost the same logits for every prompt, and the
normalised score then divides float32 rounding by a near-zero gap).
"""

from __future__ import annotations

import json

import pytest
import torch
from handwired import copy_head_model, operand_a_dataset, save

from arithinterp import ArithInterpError, patching
from arithinterp.cli import main
from arithinterp.models import load
from arithinterp.patching import (
    ACTIVATIONS,
    Component,
    Site,
    activation_patch,
    parse_position,
    patch_components,
    sites_for,
)
from arithinterp.tasks import make_dataset


def build_wide_random_gpt2(folder, tokenizer, *, n_layer=3, n_head=4, d_model=64, init=0.4, seed=0):
    """A random GPT-2 whose logits depend strongly on the prompt (initializer_range `init`)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=d_model, vocab_size=len(tokenizer), n_positions=64,
                     initializer_range=init, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, char_tokenizer):
    return load(str(build_wide_random_gpt2(tmp_path_factory.mktemp("wide"), char_tokenizer)))


@pytest.fixture(scope="module")
def wide_data(wide_model):
    ds = make_dataset(wide_model.tokenizer, task="add", n=6, seed=1)
    assert len(ds) == 6 and ds.clean_tokens.shape[1] == 9
    return ds


def _mixed_sites(n_layers: int, n_heads: int, n_pos: int) -> list[Site]:
    """Every activation kind, at a middle position, the final position and all positions, in the first or last
    layer (some kinds in both)."""
    sites = []
    for i, act in enumerate(ACTIVATIONS):
        for layer in (0, n_layers - 1) if i % 3 == 0 else ((0,) if i % 2 else (n_layers - 1,)):
            for pos in (2, n_pos - 1, None):
                head = (layer + pos if pos is not None else layer + 1) % n_heads
                sites.append(Site(activation=act, layer=layer, head=head if act in patching.HEAD_ACTIVATIONS else None,
                                  pos=pos))  # fmt: skip
    return sites


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_every_granularity_matches_transformer_lens(wide_model, wide_data, direction):
    sites = _mixed_sites(3, 4, wide_data.clean_tokens.shape[1])
    fast = activation_patch(wide_model, wide_data, sites=sites, direction=direction, engine="fast", progress=False)
    ref = activation_patch(wide_model, wide_data, sites=sites, direction=direction, engine="transformer-lens",
                           progress=False)  # fmt: skip
    gap = (fast.clean.mean() - fast.corrupted.mean()).abs()
    assert gap > 0.2, "the random model should separate clean from corrupted"
    assert (fast.patched - ref.patched).abs().max() < 1e-4
    assert (fast.scores - ref.scores).abs().max() < 1e-4
    # the sweep is not trivial: patches move the metric, by different amounts
    assert fast.effects.abs().max() > 0.1 and fast.scores.std() > 0.05


def test_sweeps_by_position_match_transformer_lens(wide_model, wide_data):
    """Head outputs at each position and the residual stream at each position, as in the parity contract."""
    for gran in ("heads", "resid_pre"):
        sites = sites_for(gran, n_layers=3, n_heads=4, n_pos=9, position="each")
        sites = [s for s in sites if s.layer == 1 or gran != "heads"]  # keep transformer-lens' share short
        fast = activation_patch(wide_model, wide_data, sites=sites, engine="fast", progress=False)
        ref = activation_patch(wide_model, wide_data, sites=sites, engine="transformer-lens", progress=False)
        assert (fast.scores - ref.scores).abs().max() < 1e-4, gran


def test_truths_of_the_residual_stream(wide_model, wide_data):
    """Patching the whole residual stream before layer 0 (denoising) gives the clean run: score 1 exactly;
    noising it gives the corrupted run: score 0. A prefix position before the first difference does nothing."""
    for direction, expected in (("denoising", 1.0), ("noising", 0.0)):
        res = activation_patch(wide_model, wide_data, granularity="resid_pre", position="all", direction=direction,
                               progress=False)  # fmt: skip
        assert res.scores[0].item() == pytest.approx(expected, abs=1e-5)
    bos = activation_patch(wide_model, wide_data, granularity="resid_post", position=0, progress=False)
    assert bos.scores.abs().max() < 1e-5  # position 0 is <bos> in both prompts


def test_patch_components_is_the_final_position_sweep(wide_model, wide_data):
    comps = patch_components(wide_model, wide_data, progress=False)
    sweep = activation_patch(wide_model, wide_data, granularity="components", progress=False)
    assert [c.name for c in comps.components] == [c.name for c in sweep.components]
    assert torch.equal(comps.patched, sweep.patched)
    assert comps.info == {"engine": "fast", "direction": "denoising", "position": "final"}
    rec = comps.ranked()[0]
    assert list(rec) == ["name", "kind", "layer", "head", "score", "ci"]  # the JSON contract of issue 2
    # the same sites as explicit Sites at the final position give the same numbers
    sites = sites_for("components", n_layers=3, n_heads=4, n_pos=9, position=8)
    as_sites = activation_patch(wide_model, wide_data, sites=sites, progress=False)
    assert torch.allclose(as_sites.patched, comps.patched, atol=1e-6)


def test_batching_and_chunking_do_not_change_numbers(wide_model, wide_data, monkeypatch):
    sites = [s for s in sites_for("head_v", n_layers=3, n_heads=4, n_pos=9, position="each") if s.layer == 1]
    ref = activation_patch(wide_model, wide_data, sites=sites, progress=False)
    monkeypatch.setattr(patching, "_PASS_BUDGET", 2000)  # forces one patch per pass
    small = activation_patch(wide_model, wide_data, sites=sites, batch_size=4, progress=False)
    assert torch.allclose(ref.patched, small.patched, atol=1e-5)


def test_gpt2_tokenizer_model_all_granularities(gpt2_tiny_dir):
    """The real GPT-2 tokenizer (vocabulary 50257) on a small random model: engines agree on raw values."""
    model = load(str(gpt2_tiny_dir))
    ds = make_dataset(model.tokenizer, task="add", n=4, style="equation")
    sites = _mixed_sites(2, 4, ds.clean_tokens.shape[1])[::5]
    fast = activation_patch(model, ds, sites=sites, engine="fast", progress=False)
    ref = activation_patch(model, ds, sites=sites, engine="transformer-lens", progress=False)
    assert (fast.patched - ref.patched).abs().max() < 1e-5


@pytest.fixture(scope="module")
def gpt2_small_shaped(tmp_path_factory, gpt2_tokenizer):
    """12 layers x 12 heads, d_model 768, random weights (default initialisation), the real GPT-2 tokenizer.
    Booted from the in-memory Hugging Face model to skip writing 500 MB of weights."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=len(gpt2_tokenizer), n_positions=64)
    hf = GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("gpt2small")
    cfg.save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=gpt2_tokenizer, device="cpu")
    return bridge.eval()


@pytest.mark.slow
def test_gpt2_small_shaped_parity(gpt2_small_shaped):
    model = gpt2_small_shaped
    ds = make_dataset(model.tokenizer, task="add", n=6, style="equation", seed=3)
    last = ds.clean_tokens.shape[1] - 1
    sites = [Site(activation="z", layer=layer, head=h, pos=last) for layer, h in ((0, 0), (6, 7), (11, 3))]
    sites += [Site(activation="z", layer=3, head=5, pos=None)]
    sites += [Site(activation=a, layer=layer, pos=p) for a, layer, p in
              (("resid_pre", 0, last), ("resid_pre", 5, 2), ("resid_mid", 11, last), ("resid_post", 8, 1))]  # fmt: skip
    for direction, some in (("denoising", sites), ("noising", sites[1::3])):
        sites = some
        fast = activation_patch(model, ds, sites=sites, direction=direction, engine="fast", progress=False)
        ref = activation_patch(model, ds, sites=sites, direction=direction, engine="transformer-lens",
                               progress=False)  # fmt: skip
        assert (fast.clean.mean() - fast.corrupted.mean()).abs() > 0.01
        assert (fast.scores - ref.scores).abs().max() < 1e-4
        assert (fast.patched - ref.patched).abs().max() < 1e-4


def test_copy_head_truth_in_both_directions(copy_head_dir, char_tokenizer):
    """L1H2 copies operand a: denoising it restores the clean run (1), noising it destroys it (0); the rest
    do nothing (0 when denoising, 1 when noising). Its query, key, value and pattern tell apart what matters:
    the value (a's digit) carries the answer, the key and pattern (attend to position 1) do not change."""
    model = load(str(copy_head_dir))
    ds = operand_a_dataset(char_tokenizer, n=30)
    for direction, on, off in (("denoising", 1.0, 0.0), ("noising", 0.0, 1.0)):
        res = patch_components(model, ds, direction=direction, progress=False)
        scores = {c.name: float(s) for c, s in zip(res.components, res.scores)}
        assert scores.pop("L1H2") == pytest.approx(on, abs=1e-4)
        assert all(s == pytest.approx(off, abs=1e-4) for s in scores.values())
        assert res.ranked()[0]["name"] == "L1H2"
    sites = [Site(activation=a, layer=1, head=2, pos=None) for a in ("q", "k", "v", "pattern")]
    parts = activation_patch(model, ds, sites=sites, progress=False)
    assert parts.scores.tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0], abs=1e-4)
    by_pos = activation_patch(model, ds, granularity="head_v", position="each", progress=False)
    assert by_pos.score_of("L1H2.v@1") == pytest.approx(1.0, abs=1e-4)  # a sits at position 1
    assert by_pos.score_of("L1H2.v@3") == pytest.approx(0.0, abs=1e-4)


def test_site_names_positions_and_errors(tiny_model):
    assert Site(activation="q", layer=2, head=1, pos=5).name == "L2H1.q@5"
    assert Site(activation="z", layer=0, head=3, pos=None).name == "L0H3@all"
    assert Site(activation="resid_mid", layer=1, pos=0).name == "L1.resid_mid@0"
    assert Site(activation="attn_out", layer=1, pos=2).name == "ATTN1@2"
    assert parse_position("final", 9) == [8] and parse_position("-2", 9) == [7] and parse_position("all", 9) == [None]
    assert len(sites_for("head_pattern", n_layers=3, n_heads=4, n_pos=9, position="each")) == 3 * 4 * 9
    with pytest.raises(ArithInterpError, match="position 12"):
        parse_position(12, 9)
    with pytest.raises(ArithInterpError, match="unknown granularity"):
        sites_for("neurons", n_layers=3, n_heads=4, n_pos=9)
    with pytest.raises(ArithInterpError, match="pass a head"):
        Site(activation="mlp_out", layer=0, head=1)
    ds = make_dataset(tiny_model.tokenizer, task="add", n=3)
    with pytest.raises(ArithInterpError, match="position 30 is out of range"):
        activation_patch(tiny_model, ds, sites=[Site(activation="z", layer=0, head=0, pos=30)], progress=False)
    with pytest.raises(ArithInterpError, match="unknown direction"):
        activation_patch(tiny_model, ds, direction="sideways", progress=False)
    assert Component.parse("L3H1").record() == {"name": "L3H1", "kind": "head", "layer": 3, "head": 1}


def test_cli_granularity_and_direction(tiny_model_dir, tmp_path):
    out = tmp_path / "resid"
    code = main(["patch", "--model", str(tiny_model_dir), "--n", "6", "--out", str(out), "--granularity",
                 "resid_pre", "--position", "each", "--direction", "noising"])  # fmt: skip
    assert code == 0
    rec = json.loads((out / "patch.json").read_text())
    assert rec["method"] == "activation" and rec["granularity"] == "resid_pre" and rec["direction"] == "noising"
    assert len(rec["components"]) == 3 * rec["examples"][0]["clean"].__len__() + 3  # <bos> + prompt, 3 layers
    assert {"activation", "pos"} <= set(rec["components"][0])
    assert "L0.resid_pre@" in (out / "patch.html").read_text()
    assert main(["patch", "--model", str(tiny_model_dir), "--n", "4", "--out", str(tmp_path / "x"),
                 "--position", "middle"]) == 2  # fmt: skip


def test_cli_default_record_is_unchanged(tiny_model_dir, tmp_path):
    out = tmp_path / "default"
    assert main(["patch", "--model", str(tiny_model_dir), "--n", "6", "--out", str(out)]) == 0
    rec = json.loads((out / "patch.json").read_text())
    assert rec["granularity"] == "head_z+mlp_out" and rec["position"] == "final" and rec["method"] == "activation"
    assert set(rec) >= {"model", "task", "method", "metric", "n", "seed", "baseline", "components", "examples",
                        "direction", "engine"}  # fmt: skip
    assert list(rec["components"][0]) == ["name", "kind", "layer", "head", "score", "ci"]


def test_handwired_save_roundtrip(tmp_path):
    """The copy-head fixture's model really is what the truth tests above assume (sanity of the fixture)."""
    model = load(str(save(copy_head_model(layer=1, head=2), tmp_path / "m")))
    assert int(model.cfg.n_layers) == 2 and int(model.cfg.n_heads) == 4
