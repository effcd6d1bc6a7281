"""circuit.json, selection and score vectors, checked on values worked out by hand."""

from __future__ import annotations

import json

import pytest

from arithinterp import ArithInterpError
from arithinterp.circuit import Circuit, Selection, as_scores, jaccard, rank, select_components


def test_scores_from_any_vector_and_their_errors():
    pairs = [("L0H1", 1.0), ("MLP0", -2.0)]
    assert as_scores(pairs) == as_scores(dict(pairs))
    assert [c.name for c in rank(as_scores(pairs))] == ["MLP0", "L0H1"]  # by |score|
    # ties keep model order: layer, then heads before the MLP
    assert [c.name for c in rank(as_scores({"MLP0": 1.0, "L1H0": 1.0, "L0H3": -1.0}))] == ["L0H3", "MLP0", "L1H0"]
    with pytest.raises(ArithInterpError, match="twice"):
        as_scores([("L0H1", 1.0), ("L0H1", 2.0)])
    with pytest.raises(ArithInterpError, match="finite"):
        as_scores({"L0H1": float("nan")})
    with pytest.raises(ArithInterpError, match="not a head"):
        as_scores({"head7": 1.0})
    with pytest.raises(ArithInterpError, match="empty"):
        as_scores({})


def test_selection_on_paper():
    scores = {"L0H0": 0.1, "L0H1": -0.8, "MLP0": 0.5, "L1H0": 0.02}
    names = lambda sel: [c.name for c in select_components(scores, sel)]  # noqa: E731
    assert names(Selection.top_k(2)) == ["L0H1", "MLP0"]  # by |score|
    assert names(Selection.by_threshold(0.1)) == ["L0H1", "MLP0", "L0H0"]
    assert names(Selection.by_threshold(0.1, direction="above")) == ["MLP0", "L0H0"]
    assert names(Selection.by_threshold(-0.05, direction="below")) == ["L0H1"]
    assert jaccard(["L0H1", "MLP0"], ["MLP0", "L1H0"]) == pytest.approx(1 / 3)
    for bad in (lambda: Selection.top_k(0), lambda: Selection.by_faithfulness(1.5), lambda: Selection(how="best")):
        with pytest.raises(ArithInterpError):
            bad()


def _valid_record() -> dict:
    return {
        "version": 1, "model": "m", "task": "add", "method": "activation", "metric": "logit_diff",
        "select": {"how": "top-k", "k": 1}, "faithfulness": None, "n_total_components": 10,
        "components": [{"name": "L1H2", "kind": "head", "layer": 1, "head": 2, "score": 0.8}],
    }  # fmt: skip


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(version=2), "schema version 2"),
        (lambda d: d.pop("components"), "missing key"),
        (lambda d: d.update(select={"how": "best"}), "'select'"),
        (lambda d: d["components"].append({"name": "H3"}), "not a head"),
        (lambda d: d["components"][0].update(layer=0), "layer=0 but its name says 1"),
        (lambda d: d["components"].append(dict(d["components"][0])), "listed twice"),
        (lambda d: d.update(n_total_components=0), "n_total_components"),
        (lambda d: d.update(faithfulness="high"), "'faithfulness'"),
        (lambda d: d["components"][0].update(score="x"), "score 'x'"),
    ],
)
def test_circuit_load_errors(tmp_path, edit, message):
    path = tmp_path / "circuit.json"
    path.write_text(json.dumps(_valid_record()))
    assert Circuit.load(path).names == ["L1H2"]
    record = _valid_record()
    edit(record)
    path.write_text(json.dumps(record))
    with pytest.raises(ArithInterpError, match=message):
        Circuit.load(path)


def test_circuit_load_missing_and_not_json(tmp_path):
    with pytest.raises(ArithInterpError, match="does not exist"):
        Circuit.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArithInterpError, match="not valid JSON"):
        Circuit.load(tmp_path / "bad.json")
