"""Path patching: a planted path found exactly (and nothing else), parity with transformer-lens, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformer_lens.patching as tlp
from handwired import operand_a_dataset, planted_path_model, save
from test_patching import build_wide_random_gpt2

from arithinterp import ArithInterpError
from arithinterp.cli import main
from arithinterp.models import load
from arithinterp.patching import Component, activation_patch, tl_runs
from arithinterp.path_patching import (
    Edge,
    Receiver,
    iterative_path_patch,
    parse_receivers,
    patch_edges,
    path_patch,
)
from arithinterp.tasks import make_dataset

TOL = 1e-4


@pytest.fixture(scope="module")
def planted(tmp_path_factory, char_tokenizer):
    model = load(str(save(planted_path_model(), tmp_path_factory.mktemp("planted"))))
    return model, operand_a_dataset(char_tokenizer, n=24)


def _scores(res) -> dict[str, float]:
    return {c.name: float(s) for c, s in zip(res.components, res.scores)}


@pytest.mark.parametrize("engine", ["fast", "transformer-lens"])
def test_planted_path_into_each_receiver(planted, engine):
    """Only L1H2 -> logits and L0H1 -> L1H2.v carry the answer; every other edge scores 0."""
    model, ds = planted
    expected = {"logits": {"L1H2": 1.0}, "L1H2.v": {"L0H1": 1.0}, "L1H2.q": {}, "L1H2.k": {}, "L1H0.v": {},
                "MLP0": {}, "MLP1": {}}  # fmt: skip
    if engine == "transformer-lens":  # one forward per sender there: check the decisive receivers only
        expected = {k: expected[k] for k in ("logits", "L1H2.v", "L1H0.v")}
    for receiver, nonzero in expected.items():
        res = path_patch(model, ds, receivers=[receiver], engine=engine, progress=False)
        for name, score in _scores(res).items():
            assert score == pytest.approx(nonzero.get(name, 0.0), abs=TOL), (receiver, name)


def test_path_patching_separates_what_activation_patching_merges(planted):
    """L0H1 matters (activation patching at all positions: 1) but has no direct path to the logits (0), and
    L1H0 reads L0H1's changing output (its z differs between the runs) yet passes nothing on."""
    model, ds = planted
    act = activation_patch(model, ds, granularity="heads", position="all", progress=False)
    assert act.score_of("L0H1@all") == pytest.approx(1.0, abs=TOL)
    direct = path_patch(model, ds, receivers=["logits"], progress=False)
    assert direct.score_of("L0H1") == pytest.approx(0.0, abs=TOL)
    with torch.no_grad():
        _, clean = model.run_with_cache(ds.clean_tokens)
        _, corr = model.run_with_cache(ds.corrupted_tokens)
    z = "blocks.1.attn.hook_z"
    assert (clean[z][:, -1, 0] - corr[z][:, -1, 0]).abs().max() > 0.1  # the L0H1 -> L1H0.v edge is live ...
    into_l1h0 = path_patch(model, ds, receivers=["L1H0"], progress=False)
    assert into_l1h0.scores.abs().max() < TOL  # ... and irrelevant


def test_noising_direction(planted):
    model, ds = planted
    res = path_patch(model, ds, receivers=["L1H2.v"], direction="noising", progress=False)
    scores = _scores(res)
    assert scores.pop("L0H1") == pytest.approx(0.0, abs=TOL)  # corrupting the edge destroys the answer
    assert all(s == pytest.approx(1.0, abs=TOL) for s in scores.values())
    assert res.ranked()[0]["name"] == "L0H1"


def test_iterative_path_patching_recovers_the_planted_path(planted):
    model, ds = planted
    graph = iterative_path_patch(model, ds, threshold=0.1, progress=False)
    assert {(e["sender"], e["receiver"]) for e in graph.edges} == {("L1H2", "logits"), ("L0H1", "L1H2.v")}
    assert [e["round"] for e in graph.edges] == [0, 1]
    assert graph.components() == ["L1H2", "L0H1"]
    assert set(graph.results) == {"logits", "L1H2.q", "L1H2.k", "L1H2.v"}


@pytest.fixture(scope="module")
def wide(tmp_path_factory, char_tokenizer):
    model = load(str(build_wide_random_gpt2(tmp_path_factory.mktemp("wide_pp"), char_tokenizer)))
    return model, make_dataset(model.tokenizer, task="add", n=5, seed=2)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_engines_agree_on_a_random_model(wide, direction):
    model, ds = wide
    receivers = ["L2H3.v", "L1H2", "MLP0", "logits"]
    senders = [Component.parse(n) for n in ("L0H0", "L0H1", "MLP0", "L1H2", "MLP1", "L2H0")]
    fast = path_patch(model, ds, senders=senders, receivers=receivers, direction=direction, engine="fast",
                      progress=False)  # fmt: skip
    ref = path_patch(model, ds, senders=senders, receivers=receivers, direction=direction,
                     engine="transformer-lens", progress=False)  # fmt: skip
    assert (fast.patched - ref.patched).abs().max() < 1e-4
    assert (fast.scores - ref.scores).abs().max() < 1e-4
    assert fast.effects.abs().max() > 0.1  # not a sweep of zeros


def test_matches_transformer_lens_direct_path_patching(wide):
    """`transformer_lens.patching.get_act_patch_direct_path`: one head into each later head's q, k or v."""
    model, ds = wide
    fn, *_, base_tokens, src_cache, base_cache = tl_runs(model, ds, "logit_diff", "denoising")
    edges = [Edge(sender=Component.parse("L0H1"), receiver=r) for layer in (1, 2) for h in range(4)
             for r in Receiver.parse(f"L{layer}H{h}")]  # fmt: skip
    ours = patch_edges(model, ds, edges, progress=False)
    for i, which in ((0, "q"), (2, "v")):
        ref = tlp.get_act_patch_direct_path(model, base_tokens, src_cache, base_cache, lambda lg: fn(lg).mean(),
                                            0, 1, component=which, verbose=False)  # fmt: skip
        mine = ours.patched[i::3].mean(-1)  # edges are ordered (layer, head, q/k/v)
        assert (mine - ref[1:].flatten()).abs().max() < 1e-4


def test_edges_share_runs_yet_match_one_path_patch_per_receiver(wide):
    """`patch_edges` computes each batch's runs once for all receivers; the numbers are those of separate calls."""
    model, ds = wide
    receivers = parse_receivers("logits,L2H1.v,MLP1")
    senders = [Component.parse(n) for n in ("L0H0", "MLP0", "L1H2")]
    edges = [Edge(sender=s, receiver=r) for r in receivers for s in senders if r.reads_from(s)]
    shared = patch_edges(model, ds, edges, batch_size=5, progress=False)
    for r in receivers:
        idx = [i for i, e in enumerate(edges) if e.receiver == r]
        alone = path_patch(model, ds, senders=[edges[i].sender for i in idx], receivers=[r], batch_size=5,
                           progress=False)  # fmt: skip
        assert torch.equal(shared.patched[idx], alone.patched)


def test_receivers_parse_and_errors(wide):
    assert [r.name for r in Receiver.parse("L2H1")] == ["L2H1.q", "L2H1.k", "L2H1.v"]
    assert [r.name for r in parse_receivers("logits, MLP1,L0H0.k,MLP1")] == ["logits", "MLP1", "L0H0.k"]
    assert parse_receivers([Receiver(kind="logits"), "L0H0.k", "logits"]) == parse_receivers("logits,L0H0.k")
    with pytest.raises(ArithInterpError, match="no receivers given"):
        parse_receivers(" , ")
    assert Receiver.parse("MLP1")[0].reads_from(Component.parse("L1H3"))  # same-layer head feeds the MLP
    assert not Receiver.parse("L1H0.q")[0].reads_from(Component.parse("L1H3"))
    with pytest.raises(ArithInterpError, match="not 'logits'"):
        Receiver.parse("L1H2.z")
    model, ds = wide
    with pytest.raises(ArithInterpError, match="layer 9 is out of range"):
        path_patch(model, ds, receivers=["MLP9"], progress=False)
    with pytest.raises(ArithInterpError, match="no receivers given"):  # was a bare ValueError from min()
        path_patch(model, ds, receivers=[], progress=False)
    with pytest.raises(ArithInterpError, match="threshold"):
        iterative_path_patch(model, ds, threshold=0.0, progress=False)


def test_cli_path_and_iterative(planted, tiny_model_dir, tmp_path):
    out = tmp_path / "path"
    code = main(["patch", "--model", str(tiny_model_dir), "--n", "5", "--out", str(out), "--method", "path",
                 "--receivers", "L2H1.v,MLP2", "--senders", "L0H0,L1H3,MLP1"])  # fmt: skip
    assert code == 0
    rec = json.loads((out / "patch.json").read_text())
    assert rec["method"] == "path" and rec["receivers"] == ["L2H1.v", "MLP2"]
    assert sorted(c["name"] for c in rec["components"]) == ["L0H0", "L1H3", "MLP1"]
    page = (out / "patch.html").read_text()
    assert "L2H1.v: " in page and "into value" in page  # the senders -> receivers picture
    out2 = tmp_path / "iter"
    assert main(["patch", "--model", str(tiny_model_dir), "--n", "5", "--out", str(out2), "--method", "path",
                 "--iterative", "--threshold", "0.2"]) == 0  # fmt: skip
    rec2 = json.loads((out2 / "patch.json").read_text())
    assert rec2["receivers"] == "iterative" and all(
        {"sender", "receiver", "score", "round"} <= set(e) for e in rec2["edges"]
    )
    assert main(["patch", "--model", str(tiny_model_dir), "--n", "4", "--out", str(tmp_path / "bad"), "--method",
                 "path", "--receivers", "L1H1.x"]) == 2  # fmt: skip
    assert main(["patch", "--model", str(tiny_model_dir), "--n", "4", "--out", str(tmp_path / "none"), "--method",
                 "path", "--receivers", ","]) == 2  # fmt: skip
