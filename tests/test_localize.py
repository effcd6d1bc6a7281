"""Localization: selection, faithfulness, necessity, transfer, circuit.json - against planted circuits."""

from __future__ import annotations

import json

import pytest
import torch
from handwired import operand_a_dataset, save, serial_circuit_model

from arithinterp import ArithInterpError
from arithinterp.cli import main
from arithinterp.localize import (
    ABLATIONS,
    Circuit,
    Selection,
    as_scores,
    faithfulness,
    head_attention,
    knockout_scores,
    localize,
    locate,
    necessity,
    parse_transfer_spec,
    position_labels,
    random_sets,
    select_components,
    transfer,
)
from arithinterp.models import load
from arithinterp.patching import Component, all_components, patch_components

PLANTED = {"L0H1", "L1H2"}


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The planted two-head serial circuit L0H1 -> L1H2 with active distractors (tests/handwired.py)."""
    model = load(str(save(serial_circuit_model(), tmp_path_factory.mktemp("serial"))))
    return model, operand_a_dataset(model.tokenizer, n=40)


@pytest.fixture(scope="module")
def serial_scores(serial):
    model, ds = serial
    return patch_components(model, ds, progress=False)


def _complement(model, names):
    return [c for c in all_components(int(model.cfg.n_layers), int(model.cfg.n_heads)) if c.name not in set(names)]


# ---------------------------------------------------------------------------------------------------------
# Truth: the planted serial circuit


@pytest.mark.parametrize(
    "selection",
    [Selection.top_k(2), Selection.by_threshold(0.5), Selection.by_faithfulness(0.9)],
    ids=["top-k", "threshold", "faithfulness"],
)
def test_selects_the_planted_set(serial, serial_scores, selection):
    model, ds = serial
    circuit = localize(serial_scores, select=selection, model=model, dataset=ds)
    assert set(circuit.names) == PLANTED
    assert circuit.faithfulness == pytest.approx(1.0, abs=0.01)
    assert circuit.n_total_components == 10 and circuit.fraction == pytest.approx(0.2)
    curve = [p["faithfulness"] for p in circuit.info["faithfulness_curve"]]
    assert curve[0] == pytest.approx(0.0, abs=1e-6)  # nothing kept = everything ablated
    assert curve[1] == pytest.approx(0.0, abs=0.01)  # one planted head alone cannot reach the logits
    assert curve[-1] == pytest.approx(1.0, abs=1e-5)  # everything kept = the full model


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_planted_faithful_and_complement_not(serial, ablation):
    model, ds = serial
    planted = faithfulness(model, ds, PLANTED, ablation=ablation)
    rest = faithfulness(model, ds, _complement(model, PLANTED), ablation=ablation)
    assert planted.score == pytest.approx(1.0, abs=0.01)
    assert rest.score == pytest.approx(0.0, abs=0.01)
    assert planted.accuracy_circuit == 1.0 and planted.accuracy_full == 1.0


def test_corrupted_baseline_on_paper(serial):
    """With the clean-vs-corrupted normalisation, resampling the circuit from the counterfactual prompt is the
    corrupted run (0), while zeroing it leaves logit difference exactly 0: halfway between -M and +M (0.5)."""
    model, ds = serial
    kw = dict(baseline="corrupted")
    assert faithfulness(model, ds, PLANTED, ablation="resample", **kw).score == pytest.approx(1.0, abs=1e-4)
    assert faithfulness(model, ds, _complement(model, PLANTED), ablation="resample", **kw).score == pytest.approx(
        0.0, abs=1e-4
    )
    assert faithfulness(model, ds, _complement(model, PLANTED), ablation="zero", **kw).score == pytest.approx(
        0.5, abs=1e-4
    )


def test_copy_head_circuit(copy_head_dir, char_tokenizer):
    model = load(str(copy_head_dir))
    ds = operand_a_dataset(char_tokenizer, n=30)
    scores = patch_components(model, ds, progress=False)
    circuit = localize(scores, select=Selection.by_faithfulness(0.95), model=model, dataset=ds)
    assert circuit.names == ["L1H2"]
    assert circuit.faithfulness == pytest.approx(1.0, abs=1e-5)
    assert faithfulness(model, ds, _complement(model, ["L1H2"])).score == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_necessity_random_sets_hurt_iff_they_hit_the_planted_heads(serial, ablation):
    model, ds = serial
    nec = necessity(model, ds, PLANTED, n_random=400, seed=3, ablation=ablation)
    assert nec.clean_accuracy == 1.0 and nec.knockout_accuracy < 0.3
    hit = torch.tensor([bool(PLANTED & set(s)) for s in nec.random_sets])
    assert torch.all(nec.random_accuracy[~hit] == 1.0)
    assert torch.all(nec.random_accuracy[hit] < 0.3)
    # 2 of the 8 heads, drawn at random, miss both planted heads with probability C(6,2)/C(8,2) = 15/28
    assert hit.float().mean().item() == pytest.approx(13 / 28, abs=0.08)
    assert nec.frac_random_as_damaging == pytest.approx(hit.float().mean().item(), abs=1e-6)
    assert all(sum(n.startswith("L") for n in s) == 2 for s in nec.random_sets)  # same make-up: two heads
    assert nec.percentile < 50


def test_knockout_scores_threshold_below(serial):
    model, ds = serial
    scores = knockout_scores(model, ds, metric="answer_logit")
    names = {c.name: v for c, v in scores.items()}
    assert names["L0H1"] < -0.3 and names["L1H2"] < -0.3
    assert all(abs(v) < 0.01 for n, v in names.items() if n not in PLANTED)
    chosen = select_components(scores, Selection.by_threshold(-0.05, direction="below"))
    assert {c.name for c in chosen} == PLANTED


@pytest.mark.parametrize("method", ["atp", "knockout"])
def test_other_score_methods_find_the_planted_set(serial, method):
    model, ds = serial
    circuit = locate(model, ds, method=method, select=Selection.by_faithfulness(0.9))
    assert set(circuit.names) == PLANTED and circuit.method == method


def test_transfer_across_operand_samples(serial):
    model, _ = serial
    tok = model.tokenizer
    datasets = {"seed0": operand_a_dataset(tok, n=30, seed=0), "seed1": operand_a_dataset(tok, n=30, seed=1)}
    t = transfer(model, datasets, select=Selection.by_faithfulness(0.9), n_random=10)
    assert all(set(c.names) == PLANTED for c in t.circuits.values())
    assert torch.allclose(t.overlap, torch.ones(2, 2))
    assert torch.allclose(t.faithfulness, torch.ones(2, 2), atol=0.01)
    assert torch.all(t.knockout_accuracy < 0.3) and torch.all(t.clean_accuracy == 1.0)
    assert torch.equal(t.heads_knockout_accuracy, t.knockout_accuracy)  # the planted circuit is all heads
    # the batched table equals the one-circuit functions on the same sets
    nec = necessity(model, datasets["seed1"], t.circuits["seed0"], n_random=10)
    assert t.knockout_accuracy[0, 1] == pytest.approx(nec.knockout_accuracy)
    assert t.random_accuracy[0, 1] == pytest.approx(nec.random_accuracy_mean)
    assert t.faithfulness[0, 1] == pytest.approx(faithfulness(model, datasets["seed1"], t.circuits["seed0"]).score)
    json.dumps(t.to_dict())


def test_attention_of_planted_heads(serial):
    model, ds = serial
    assert position_labels(ds) == ["<bos>", "a0", "op", "b0", "="]
    att = head_attention(model, ds, ["L0H1", "L1H2", "L0H3", "MLP0"]).mean(1)  # MLPs are skipped
    assert att.shape == (3, 5)
    assert att[0, 1] > 0.99 and att[1, 4] > 0.99 and att[2, 3] > 0.99  # a, itself, b


# ---------------------------------------------------------------------------------------------------------
# Scores, selection, random sets


def test_scores_from_any_vector(serial_scores):
    from_result = as_scores(serial_scores)
    from_dict = as_scores({c.name: float(s) for c, s in zip(serial_scores.components, serial_scores.scores)})
    from_pairs = as_scores(list(from_dict.items()))
    assert from_result == from_dict == from_pairs  # a PatchResult reads like the plain vectors (test_circuit.py)


def test_faithfulness_selection_needs_a_model():
    with pytest.raises(ArithInterpError, match="model"):
        localize({"L0H1": 1.0, "MLP0": 0.5}, select=Selection.by_faithfulness(0.9))


def test_random_sets_match_size_and_kinds():
    circuit = [Component.parse(n) for n in ("L0H1", "L2H3", "MLP1")]
    sets = random_sets(circuit, 3, 4, 50, seed=0)
    assert all(len(set(s)) == 3 and sum(c.kind == "mlp" for c in s) == 1 for s in sets)
    assert sets == random_sets(circuit, 3, 4, 50, seed=0) and sets != random_sets(circuit, 3, 4, 50, seed=1)


# ---------------------------------------------------------------------------------------------------------
# circuit.json


def test_circuit_json_roundtrip(serial, serial_scores, tmp_path):
    model, ds = serial
    circuit = localize(serial_scores, select=Selection.top_k(2), model=model, dataset=ds)
    path = circuit.save(tmp_path / "circuit.json")
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["select"] == {"how": "top-k", "k": 2}
    assert [c["name"] for c in data["components"]] == circuit.names
    assert set(data["components"][0]) == {"name", "kind", "layer", "head", "score"}
    assert data["n_total_components"] == 10 and data["faithfulness"] == pytest.approx(1.0, abs=0.01)
    assert "definition" in data["faithfulness_details"]
    back = Circuit.load(path)
    assert back == circuit


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_parse_transfer_spec():
    assert parse_transfer_spec("answer_token=1") == {"answer_token": 1}
    assert parse_transfer_spec("range=0:499,counterfactual=random") == {
        "operand_range": (0, 499),
        "counterfactual": "random",
    }
    for bad in ("colour=red", "answer_token", "range=1", ""):
        with pytest.raises(ArithInterpError):
            parse_transfer_spec(bad)


@pytest.mark.slow
def test_cli_localize(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["localize", "--model", str(tiny_model_dir), "--n", "12", "--select", "top-k", "--k", "3",
            "--n-random", "5", "--transfer", "answer_token=1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    circuit = Circuit.load(out / "circuit.json")
    assert len(circuit) == 3 and circuit.n_total_components == 15
    data = json.loads((out / "circuit.json").read_text())
    assert data["necessity"]["n_random"] == 5 and data["transfer"]["names"] == ["source", "answer_token=1"]
    assert data["arithinterp_version"] and data["dataset_fingerprint"] and len(data["examples"]) == 12
    assert "plotly" in (out / "localize.html").read_text()
    assert "circuit:" in capsys.readouterr().out
    assert main(args) == 2  # non-empty --out without --overwrite
    bad = ["localize", "--model", str(tiny_model_dir), "--transfer", "colour=red", "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "colour" in capsys.readouterr().err
