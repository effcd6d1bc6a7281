"""Probes against planted truth: features and Fourier codes we put in are found, controls stay at chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arithinterp._errors import ArithInterpError
from arithinterp.probes import (
    ProbeConfig,
    digit_embeddings,
    digit_means,
    fourier_basis,
    fourier_fit,
    full_basis,
    hook_label,
    pca,
    probe,
    probe_report,
    probe_store,
    target_kind,
    target_values,
)
from arithinterp.store import ActivationStore, StoreConfig, collect
from arithinterp.tasks import TaskConfig, make_dataset

FAST = ProbeConfig(folds=3, control="both")


def test_planted_linear_feature_is_recovered_and_controls_stay_at_chance():
    rng = np.random.default_rng(1)
    n, d = 600, 32
    value = rng.uniform(0, 100, n)
    direction = rng.standard_normal(d)
    X = rng.standard_normal((n, d)) + np.outer(value, direction) / 10
    s = probe(X, value, FAST)
    assert s.kind == "regression" and s.metric == "r2" and s.chance == 0.0
    assert s.score > 0.99
    # a fit to noise scores about -features/train-rows held out (here -32/400): at or just below chance
    assert -0.15 < s.control["shuffle"] < 0.02 and -0.15 < s.control["random"] < 0.02


def test_planted_digit_code_is_classified_and_controls_stay_at_chance():
    rng = np.random.default_rng(2)
    n, d = 800, 48
    y = rng.integers(0, 10, n)
    X = 3 * rng.standard_normal((10, d))[y] + rng.standard_normal((n, d))
    s = probe(X, y, FAST)
    assert s.kind == "classification" and s.metric == "accuracy"
    assert s.score > 0.98
    assert abs(s.chance - np.bincount(y).max() / n) < 1e-12
    assert abs(s.control["shuffle"] - s.chance) < 0.08 and abs(s.control["random"] - s.chance) < 0.08


def test_noise_is_not_decodable():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 500)
    s = probe(rng.standard_normal((500, 64)), y, ProbeConfig(folds=3))
    assert s.score < s.chance + 0.08


def test_ridge_classifier_also_recovers_the_code():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    X = rng.standard_normal((400, 16))
    X[:, 5] += 4 * y
    s = probe(X, y, ProbeConfig(folds=3, estimator="ridge"))
    assert s.score > 0.97 and abs(s.control["shuffle"] - s.chance) < 0.1


def test_fourier_basis_on_paper():
    B = fourier_basis()
    assert B.shape == (10, 6)
    np.testing.assert_allclose(B[0], [1, 1, 0, 1, 0, 1], atol=1e-12)
    np.testing.assert_allclose(B[5], [1, -1, 0, 1, 0, -1], atol=1e-12)  # cos π, sin π, cos 2π, sin 2π, (-1)^5
    np.testing.assert_allclose(B[1, 1:3], [np.cos(np.pi / 5), np.sin(np.pi / 5)])
    F = full_basis()
    gram = F.T @ F
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-9)  # orthogonal, spans all of R^10
    assert np.linalg.matrix_rank(F) == 10


def test_fourier_fit_recovers_a_planted_fourier_code():
    rng = np.random.default_rng(5)
    reps = fourier_basis() @ rng.standard_normal((6, 40)) + 1e-3 * rng.standard_normal((10, 40))
    fit = fourier_fit(reps)
    assert fit.median_r2 > 0.999 and fit.r2 > 0.999 and fit.median_r2_dims > 0.999
    assert fit.median_r2_full == pytest.approx(1.0)
    assert fit.spectrum[[0, 1, 4]].sum() > 0.999  # all variance at periods 10, 5 and 2
    assert 0.35 < fit.control_r2 < 0.75  # a random basis of 6 functions explains ~5/9


def test_fourier_fit_sees_no_fourier_code_where_there_is_none():
    rng = np.random.default_rng(6)
    other = fourier_basis((3, 4))[:, 1:]  # periods 10/3 and 2.5 only: orthogonal to the Fourier basis
    fit = fourier_fit(other @ rng.standard_normal((4, 40)))
    assert fit.median_r2 < 1e-6 and fit.median_r2_full == pytest.approx(1.0)
    assert fit.spectrum[[2, 3]].sum() > 0.999


def test_fourier_fit_on_examples_and_digit_means():
    rng = np.random.default_rng(7)
    code = fourier_basis() @ rng.standard_normal((6, 20))
    y = rng.integers(0, 10, 2000)
    X = code[y] + 0.3 * rng.standard_normal((2000, 20))
    per_example = fourier_fit(X, y)
    assert per_example.r2 == pytest.approx(per_example.r2_full, abs=0.01)  # the digit's effect is all Fourier
    assert fourier_fit(digit_means(X, y)).median_r2 > 0.99
    with pytest.raises(ArithInterpError, match="never occur"):
        digit_means(X[y < 9], y[y < 9])


METAS = [{"a": 12, "a_digits": [2, 1], "carries": [True, False], "partial_products": [[1, 2], [3, 4]],
          "counterfactual": {"result": 7}, "op": "add"}, {"a": 30, "a_digits": [0, 3], "carries": [False, True],
          "partial_products": [[5, 6], [7, 8]], "counterfactual": {"result": 9}, "op": "add"}]  # fmt: skip


def test_target_values_read_any_metadata():
    assert target_values(METAS, "a").tolist() == [12, 30]
    assert target_values(METAS, "a_digits[1]").tolist() == [1, 3]
    assert target_values(METAS, "carries[0]").tolist() == [1, 0]
    assert target_values(METAS, "partial_products[1][0]").tolist() == [3, 7]
    assert target_values(METAS, "counterfactual.result").tolist() == [7, 9]
    with pytest.raises(ArithInterpError, match="no field 'b'.*available: a, a_digits"):
        target_values(METAS, "b")
    with pytest.raises(ArithInterpError, match="does not exist in example 0"):
        target_values(METAS, "a_digits[2]")
    with pytest.raises(ArithInterpError, match="not a number"):
        target_values(METAS, "op")
    with pytest.raises(ArithInterpError, match="not a metadata key"):
        target_values(METAS, "a_digits(0)")
    assert target_kind(np.array([0, 1, 9])) == "classification"
    assert target_kind(np.arange(100)) == "regression"
    assert target_kind(np.array([0.5, 1.0])) == "regression"


def _planted_store(seed=0, n=400):
    """Two hooks x three positions; digit `a_digits[0]` is written only at hook L1, position 2."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    code = torch.tensor(4 * rng.standard_normal((10, 24)), dtype=torch.float32)
    h0, h1 = torch.randn(n, 3, 24), torch.randn(n, 3, 24)
    h1[:, 2] += code[torch.as_tensor(y)]
    meta = [{"a_digits": [int(v)], "a": int(v)} for v in y]
    tensors = {"blocks.0.hook_resid_post": h0, "blocks.1.hook_resid_post": h1}
    return ActivationStore.from_tensors(tensors, meta, position_labels=["x", "y", "="])


def test_probe_store_finds_the_planted_site():
    store = _planted_store()
    r = probe_store(store, "a_digits[0]", config=FAST, progress=False)
    assert r.kind == "classification" and r.score.shape == (2, 3) and r.classes == list(range(10))
    assert r.score[1, 2] > 0.98
    others = np.delete(r.score.ravel(), 5)
    assert np.all(others < r.chance + 0.1)
    assert np.all(np.abs(r.control["shuffle"] - r.chance) < 0.1)
    assert r.first_hook(0.95, 2) == "blocks.1.hook_resid_post" and r.first_hook(0.95, 0) is None
    assert r.best() == {"hook": "blocks.1.hook_resid_post", "position": 2, "score": r.score[1, 2]}
    report = probe_report(store, "a_digits[0]", config=FAST, progress=False)
    rec = report.record()
    assert rec["first_decodable"] == {"0": None, "1": None, "2": "blocks.1.hook_resid_post"}
    assert report.fourier["L1@2"].median_r2_full == pytest.approx(1.0)
    assert json.loads(json.dumps(rec))["best"]["position"] == 2


def test_probe_report_reads_the_store_once_and_matches_a_second_read(monkeypatch):
    """The Fourier fits and the PCA come from the arrays the probes read; reading the store again (as it was
    done before) gives the same numbers."""
    from arithinterp.probes import probe_rows

    store = _planted_store(seed=1)
    gets = []
    get = store.get
    monkeypatch.setattr(store, "get", lambda hook, **kw: gets.append(hook) or get(hook, **kw))
    report = probe_report(store, "a_digits[0]", config=FAST, progress=False)
    assert gets == store.hooks  # one read per hook, by the probes
    best = report.result.best()
    rows = probe_rows(store.n, FAST)
    y = target_values(store, "a_digits[0]")[rows]
    for hook in store.hooks:
        X = get(hook, positions=[best["position"]], examples=rows).reshape(len(rows), -1).float().numpy()
        fit = report.fourier[f"{hook_label(hook)}@{best['position']}"]
        np.testing.assert_array_equal(fit.r2_rows, fourier_fit(digit_means(X, y)).r2_rows)
    X = get(best["hook"], positions=[best["position"]], examples=rows).reshape(len(rows), -1).float().numpy()
    np.testing.assert_array_equal(report.pca_examples[0], pca(X)[0])
    np.testing.assert_array_equal(report.pca_examples[1], y)


def test_probe_on_the_hand_wired_copy_head(copy_head_dir):
    """The copy head (L1H2) moves a's digit to the final position: readable there after block 1, not before."""
    from arithinterp.models import load

    model = load(str(copy_head_dir))
    ds = make_dataset(model.tokenizer, TaskConfig(n=300, digits=1))
    store = collect(model, ds, StoreConfig(), progress=False)
    assert store.hooks == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    r = probe_store(store, "a_digits[0]", positions=[1, 4], config=ProbeConfig(folds=3), progress=False)
    assert np.all(r.score[:, 0] == 1.0)  # position 1 holds a's token itself
    final = r.score[:, 1]
    assert final[2] == 1.0 and final[0] < r.chance + 0.05 and final[1] < r.chance + 0.05
    assert r.first_hook(0.95, 4) == "blocks.1.hook_resid_post"


def test_pca_of_a_circle():
    angle = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    basis = np.linalg.qr(np.random.default_rng(8).standard_normal((10, 2)))[0]
    X = np.stack([np.cos(angle), np.sin(angle)], 1) @ basis.T
    coords, explained = pca(X)
    assert coords.shape == (40, 2) and explained.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(explained, [0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(coords, axis=1), 1.0, atol=1e-9)


def test_digit_embeddings_are_the_digit_rows(tiny_model):
    emb = digit_embeddings(tiny_model)
    W_E = tiny_model.original_model.get_input_embeddings().weight
    ids = [tiny_model.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert torch.equal(emb, W_E[ids].detach())
    assert hook_label("blocks.0.hook_resid_pre") == "embed" and hook_label("blocks.2.hook_resid_post") == "L2"


def test_cli_probe(tiny_model_dir, tmp_path, capsys):
    from arithinterp.cli import main

    out = tmp_path / "p"
    args = ["probe", "--model", str(tiny_model_dir), "--n", "120", "--target", "carries[0]", "--positions", "-1",
            "--folds", "3", "--control", "both", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rec = json.loads((out / "probe.json").read_text())
    assert rec["target"] == "carries[0]" and rec["kind"] == "classification" and rec["positions"] == [8]
    assert rec["hooks"] == ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert len(rec["scores"]) == 4 and set(rec["scores"][0]["control"]) == {"shuffle", "random"}
    assert rec["model"] == str(tiny_model_dir) and rec["n"] == 120 and "embedding" in rec["fourier"]
    assert (out / "probe.html").stat().st_size > 10_000
    assert main(["probe", "--model", str(tiny_model_dir), "--target", "nope", "--out", str(tmp_path / "q")]) == 2
    assert "no field 'nope'" in capsys.readouterr().err


def test_multiplication_targets_need_no_code(tiny_model):
    """mul4's partial products and running sums are probe targets by name, straight from the metadata."""
    ds = make_dataset(tiny_model.tokenizer, TaskConfig(task="mul4", n=60))
    store = collect(tiny_model, ds, StoreConfig(hooks=("blocks.2.hook_resid_post",), positions=(-1,)), progress=False)
    assert target_values(store, "partial_products[2][1]").tolist() == [
        e.meta["partial_products"][2][1] for e in ds.examples
    ]
    r = probe_store(store, "running_sums[3]", config=ProbeConfig(folds=3), progress=False)
    assert r.kind == "regression" and r.metric == "r2" and np.isfinite(r.score).all()
