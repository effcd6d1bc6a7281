"""Fourier spectra over number tokens and Fourier filters: planted periodic signals, exact projections."""

from __future__ import annotations

import math

import pytest
import torch
from handwired import DIGIT_IDS, copy_head_model, operand_a_dataset, save

from arithinterp import _gpt2
from arithinterp._errors import ArithInterpError
from arithinterp.attribution import decompose_residual, effective_unembed
from arithinterp.fourier import (
    FilterResult,
    FourierFilter,
    band_frequencies,
    band_projector,
    component_spectra,
    embedding_spectrum,
    evaluate_filters,
    number_tokens,
    remove_band,
    spectrum,
)
from arithinterp.models import load
from arithinterp.tasks import make_dataset

N = 360  # a number axis on which period 10 is a whole frequency (k = 36)


def planted(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """(period-10 wave of amplitude 2, period-120 wave of amplitude 0.5) along the number axis, float64."""
    m = torch.arange(n, dtype=torch.float64)
    return 2.0 * torch.cos(2 * math.pi * m / 10 + 0.3), 0.5 * torch.sin(2 * math.pi * 3 * m / n + 1.1)


def test_planted_period_shows_up_exactly_at_its_period():
    ten, slow = planted()
    s = spectrum((ten + slow + 0.7)[None])  # one example; 0.7 is a constant (DC) offset
    p = s.power.double()
    assert p.sum() == pytest.approx(float(((ten + slow + 0.7) ** 2).mean()), rel=1e-5)  # Parseval
    assert p[36] == pytest.approx(2.0**2 / 2, rel=1e-5) and s.periods[36] == 10.0
    assert p[3] == pytest.approx(0.5**2 / 2, rel=1e-5) and s.periods[3] == 120.0
    assert p[0] == pytest.approx(0.7**2, rel=1e-5)
    assert float(s.magnitude[36]) == pytest.approx(2.0 * N / 2, rel=1e-5)  # |F_k| of A cos(...) is A N / 2
    rest = torch.ones_like(p, dtype=torch.bool)
    rest[[0, 3, 36]] = False
    assert p[rest].abs().max() < 1e-9
    assert s.record()["top_periods"][:2] == [10.0, 120.0]
    assert float(s.band_fraction("high")) == pytest.approx(2.0 / (2.0 + 0.125), rel=1e-5)
    assert float(s.band_fraction("low")) == pytest.approx(0.125 / (2.0 + 0.125), rel=1e-5)


def test_remove_band_removes_the_planted_period_and_nothing_else():
    ten, slow = planted()
    out = remove_band(ten + slow, band_frequencies(N, "p10"))
    assert (out - slow).abs().max() < 1e-10
    out = remove_band(ten + slow, band_frequencies(N, "low"))
    assert (out - ten).abs().max() < 1e-10


def test_bands():
    assert band_frequencies(10, "low") == [1] and band_frequencies(10, "high") == [2, 3, 4, 5]
    assert band_frequencies(N, "low") == list(range(1, 36)) and band_frequencies(N, "high") == list(range(36, 181))
    assert band_frequencies(N, "p10,5") == [36, 72] and band_frequencies(10, "k1-2,5") == [1, 2, 5]
    assert band_frequencies(10, "dc") == [0] and band_frequencies(10, "all") == [1, 2, 3, 4, 5]
    for bad in ("p7", "k9", "wobble", "kx"):
        with pytest.raises(ArithInterpError):
            band_frequencies(10, bad)


def test_filter_projection_with_an_orthonormal_readout_removes_exactly_the_band():
    """With orthonormal number read-outs the least-norm residual change is the band itself, so the number
    logits lose the planted period-10 wave and keep everything else."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(400, N, dtype=torch.float64, generator=g))  # (d_model, number)
    ten, slow = planted()
    unread = torch.randn(400, dtype=torch.float64, generator=g)
    x = q @ (ten + slow) + unread - q @ (q.T @ unread)  # plus a part that no number token reads
    proj = band_projector(q, band_frequencies(N, "p10"))
    logits = q.T @ (x - proj @ x)
    assert (logits - remove_band(q.T @ x, [36])).abs().max() < 1e-9
    assert (logits - slow).abs().max() < 1e-9
    assert (x - proj @ x - (x - q @ ten)).abs().max() < 1e-9  # the change is exactly the planted wave


def test_filter_projection_is_the_closest_zero_band_vector():
    """For any read-out: x - Px has zero band coefficients, P is an orthogonal projector, and no other
    zero-band vector is closer to x."""
    g = torch.Generator().manual_seed(1)
    read = torch.randn(64, 10, generator=g)
    freqs = band_frequencies(10, "high")
    proj = band_projector(read, freqs)
    x = torch.randn(64, generator=g)
    y = x - proj @ x
    coeffs = torch.fft.rfft((read.T @ y).double())[freqs]
    assert coeffs.abs().max() < 1e-4
    assert torch.allclose(proj, proj.T, atol=1e-5) and torch.allclose(proj @ proj, proj, atol=1e-5)
    null = torch.eye(64) - proj  # any vector in the null space of the band map is y + null @ z
    for _ in range(5):
        other = y + null @ torch.randn(64, generator=g)
        assert (x - other).norm() >= (x - y).norm() - 1e-5


def test_number_tokens(char_tokenizer, gpt2_tokenizer):
    digits = number_tokens(char_tokenizer)
    assert digits.kind == "digits" and digits.ids.tolist() == DIGIT_IDS
    nums = number_tokens(gpt2_tokenizer)
    assert nums.n == 362 and gpt2_tokenizer.decode([int(nums.ids[123])]) == " 123"
    assert number_tokens(gpt2_tokenizer, max_n=100).n == 100
    assert number_tokens(gpt2_tokenizer, leading_space=False).n == 521


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory):
    return load(str(save(copy_head_model(layer=1, head=2), tmp_path_factory.mktemp("copyf"))))


def test_component_spectra_final_is_the_models_number_logits(tiny_model):
    ds = make_dataset(tiny_model.tokenizer, n=16)
    cs = component_spectra(tiny_model, ds)
    logits = tiny_model(ds.clean_tokens)[:, -1].detach()
    want = spectrum(logits[:, cs.numbers.ids])
    assert torch.allclose(cs.get("final").power, want.power, rtol=1e-4, atol=1e-8)
    assert {"L0H0", "MLP2", "ATTN1", "attn", "mlp", "final"} <= set(cs.names)


def test_embedding_spectrum_finds_a_planted_period(tmp_path, char_tokenizer):
    """Digit embeddings planted as a period-5 wave (k = 2 on the 0..9 axis) show power at k = 2 only."""
    from conftest import build_random_gpt2
    from transformers import GPT2LMHeadModel

    folder = build_random_gpt2(tmp_path, char_tokenizer, n_layer=1)
    hf = GPT2LMHeadModel.from_pretrained(folder)
    wave = torch.cos(2 * math.pi * 2 * torch.arange(10) / 10 + 0.4)
    with torch.no_grad():
        hf.transformer.wte.weight[DIGIT_IDS] = wave[:, None] * torch.randn(64)[None, :]
    hf.save_pretrained(folder)
    spec = embedding_spectrum(load(str(folder)))["W_E"]
    p = spec.power / spec.power.sum()
    assert p[2] > 1 - 1e-5 and spec.record()["top_periods"][0] == 5.0


def test_filter_hook_zeroes_the_band_of_the_filtered_output(tiny_model):
    """In the forward pass: the filtered MLP output has no energy in the band, and the model's logits are the
    unembedding of the residual with exactly that change."""
    ds = make_dataset(tiny_model.tokenizer, n=12)
    numbers = number_tokens(tiny_model.tokenizer)
    w = _gpt2.extract_weights(tiny_model)
    hooks = FourierFilter.parse("mlp2:high").hooks(tiny_model, numbers)
    seen = {}
    hooked = tiny_model.run_with_hooks(
        ds.clean_tokens, fwd_hooks=hooks + [("blocks.2.hook_mlp_out", lambda t, hook: seen.update(x=t.detach()))]
    )[:, -1].detach()
    out = seen["x"][:, -1] @ effective_unembed(w, numbers.ids)  # (batch, number)
    power = spectrum(out).power
    assert power[2:].max() < 1e-10 * max(power.max(), 1.0) and power[1] > 0
    d = decompose_residual(tiny_model, ds.clean_tokens)
    mlp2 = d.stack[d.names.index("MLP2")]
    final = d.final - mlp2 + seen["x"][:, -1]  # the last MLP feeds only the final layer norm
    assert torch.allclose(hooked, _gpt2.unembed(w, final), atol=1e-4)


def test_evaluate_filters_errors_on_paper(copy_model):
    """The copy-head model answers every "a+b=" with the digit a at both answer places; read least significant
    digit first that is 11a, so the error is 11a - (a + b). Filtering the MLPs (which write nothing) changes
    nothing; removing every frequency of the copy head's output leaves no digit read-out at all."""
    ds = operand_a_dataset(copy_model.tokenizer, n=24)
    res = evaluate_filters(copy_model, ds, [FourierFilter.parse("mlp:high"), FourierFilter.parse("attn1:k0-5")])
    want = [11 * e.meta["a"] - e.meta["result"] for e in ds.examples]
    assert res[0].name == "none" and res[0].errors == want
    assert res[1].errors == want and res[1].freqs == [2, 3, 4, 5]
    assert res[2].errors != want
    assert res[0].accuracy == sum(w == 0 for w in want) / len(ds)


def test_filter_result_error_classes():
    r = FilterResult(name="x", freqs=[1], accuracy=0.2, token_accuracy=0.5, errors=[0, 10, -100, 3, 57, None, 20])
    c = r.error_classes()
    assert c["correct"] == pytest.approx(1 / 7) and c["pm_power_of_10"] == pytest.approx(2 / 7)
    assert c["small"] == pytest.approx(1 / 7) and c["other"] == pytest.approx(2 / 7)
    assert c["not_a_number"] == pytest.approx(1 / 7)
    assert r.histogram()["none"] == 1 and r.record()["filter"] == "x"


def test_filter_specs():
    f = FourierFilter.parse("mlp1,2:p10")
    assert (f.site, f.layers, f.band, f.name) == ("mlp", (1, 2), "p10", "mlp1,2:p10")
    assert FourierFilter.parse("attn:high").layers is None
    for bad in ("resid:high", "attn", "mlp:wobble"):
        with pytest.raises(ArithInterpError):
            FourierFilter.parse(bad)


def test_gpt2_number_axis_spectra_and_filter(gpt2_tiny_dir):
    """The GPT-2 path: a 362-number axis (' 0'..' 361'), spectra and a filtered decode on a random model."""
    model = load(str(gpt2_tiny_dir))
    ds = make_dataset(model.tokenizer, n=6, operand_range=(1, 40))
    cs = component_spectra(model, ds)
    assert cs.numbers.n == 362 and cs.get("final").power.shape == (182,)
    res = evaluate_filters(model, ds, [FourierFilter.parse("attn:low")])
    assert len(res) == 2 and len(res[1].errors) == 6 and res[1].freqs == band_frequencies(362, "low")


def test_answer_digit_spectra_match_teacher_forced_datasets(tiny_model):
    """One run read at every answer position equals a separate dataset per scored answer digit."""
    from arithinterp.fourier import answer_digit_spectra

    ds = make_dataset(tiny_model.tokenizer, n=10, counterfactual="null-operator")
    recs = answer_digit_spectra(tiny_model, ds)
    assert [r["place"] for r in recs] == [1, 10, 100, 1000]
    for j in (1, 3):
        ds_j = make_dataset(tiny_model.tokenizer, n=10, counterfactual="null-operator", answer_token=j)
        want = component_spectra(tiny_model, ds_j).get("final").power
        assert torch.allclose(torch.tensor(recs[j]["power"]), want, rtol=1e-4, atol=1e-9)


def test_answer_coherence_finds_a_wave_that_moves_with_the_answer():
    """Each example writes cos(2 pi (m - a - 2) / 10) (peak 2 numbers after its answer a) plus a period-5 wave
    with a random phase: k = 1 is locked to the answer (coherence 1, offset 2), k = 2 is not."""
    from arithinterp.fourier import answer_coherence

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 10, (400,), generator=g)
    m = torch.arange(10, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(400, 1, generator=g, dtype=torch.float64)
    signal = torch.cos(2 * math.pi * (m - a[:, None] - 2) / 10) + torch.cos(2 * math.pi * 2 * m / 10 + phase)
    r = answer_coherence(signal, a)
    assert abs(r[1]) == pytest.approx(1.0, abs=1e-9)
    assert float(-torch.angle(r[1]) * 10 / (2 * math.pi)) == pytest.approx(2.0, abs=1e-9)
    assert abs(r[2]) < 0.15
    assert abs(answer_coherence(signal, torch.where(a > 4, -1, a))[1]) == pytest.approx(1.0, abs=1e-9)  # -1 left out
