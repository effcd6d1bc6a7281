"""Fourier analysis over number tokens, and Fourier filters as interventions.

The idea (Zhou et al. 2024, "Pre-trained LLMs use Fourier features to compute addition"; Nanda et al. 2023):
lay the logits of the number tokens 0, 1, ..., N-1 out along a "number axis" and take the discrete Fourier
transform along it. A component that estimates the magnitude of the answer writes a smooth bump (energy at
low frequencies, long periods); one that fixes the answer modulo 10 writes a pattern that repeats every 10,
5 or 2 numbers (energy at periods 10, 5, 2.5, 2: high frequencies).

* `number_tokens` finds the number axis of a tokenizer: GPT-2's single tokens ' 0'..' 361' (contiguous with a
  leading space; 0..520 without), or the ten digit tokens of the built-in character-level models, analysed
  digit-wise (each answer digit is its own 0..9 axis).
* `spectrum` takes the DFT of a signal along the number axis and reports its power by frequency k (period
  N/k) and the split of the non-constant energy between a low and a high band (`band_frequencies`).
* `component_spectra` applies that to what each part of the residual (`arithinterp.attribution`) writes to
  the number-token logits - its direct logit attribution to every number token - and to the final logits;
  `embedding_spectrum` to the number tokens' embedding and unembedding rows.
* `FourierFilter` removes a band from an attention or MLP output during the forward pass: the output x is
  replaced by the closest vector whose direct contribution to the number-token logits has no energy in the
  band, x - P x with P the orthogonal projector onto the row space of A = B R^T (B: the band's cosine and
  sine rows of the DFT, R: the read-out of number logits from the residual, final layer norm folded in).
  `evaluate_filters` greedily decodes whole answers with a filter active and reports accuracy and the
  distribution of errors; removing the band a model uses for magnitude leaves the last digits right and
  shifts the answer by exactly +-10, +-100.

Axis names: `number` (the number axis, length N), `freq` (k = 0..N//2), `component`, `batch`, `d_model`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp import _gpt2
from arithinterp._errors import ArithInterpError
from arithinterp.attribution import (
    Decomposition,
    decompose_residual,
    effective_unembed,
    gpt2_weights,
    part_contributions,
)
from arithinterp.tasks import Dataset
from arithinterp.tokenizer import is_char_tokenizer

_WHAT = "Fourier analysis over number tokens"  # what a non-GPT-2 model is told it cannot have

# ---------------------------------------------------------------------------------------------------------
# The number axis


@dataclass(frozen=True, kw_only=True)
class NumberTokens:
    """Token ids of the numbers 0..N-1 in order (`ids[n]` is the token of number n)."""

    ids: Int[Tensor, " number"]
    kind: Literal["digits", "numbers"]  # digits: the 0..9 digit tokens of a char-level model
    leading_space: bool

    @property
    def n(self) -> int:
        return len(self.ids)

    def index_of(self, token_ids: Int[Tensor, " batch"]) -> Int[Tensor, " batch"]:
        """The number (position on the axis) of each token id; -1 where a token is not a number token."""
        hit = token_ids[:, None] == self.ids[None, :]  # (batch, number)
        return torch.where(hit.any(1), hit.float().argmax(1), -1)

    def record(self) -> dict[str, Any]:
        sp = " " if self.leading_space else ""
        return {"kind": self.kind, "n": self.n, "first": f"{sp}0", "last": f"{sp}{self.n - 1}"}


def number_tokens(tokenizer, *, max_n: int | None = None, leading_space: bool = True) -> NumberTokens:
    """The number axis of `tokenizer`: the digits 0..9 for the built-in char tokenizer, otherwise the longest
    run of numbers 0, 1, 2, ... that are each one token (with a leading space by default, as answers after
    "a + b =" are written), capped at `max_n`."""
    if max_n is not None and max_n < 2:
        raise ArithInterpError(f"max_n={max_n} leaves no number axis; pass max_n >= 2.")
    if is_char_tokenizer(tokenizer):
        ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        return NumberTokens(ids=torch.tensor(ids[:max_n]), kind="digits", leading_space=False)
    sp = " " if leading_space else ""
    ids = []
    while max_n is None or len(ids) < max_n:
        t = tokenizer.encode(f"{sp}{len(ids)}", add_special_tokens=False)
        if len(t) != 1:
            break
        ids.append(t[0])
    if len(ids) < 2:
        raise ArithInterpError(
            f"numbers {sp!r}0, {sp!r}1 are not single tokens under this tokenizer, so there is no number axis; "
            "use a tokenizer with number tokens (GPT-2) or a digit-level model."
        )
    return NumberTokens(ids=torch.tensor(ids), kind="numbers", leading_space=leading_space)


# ---------------------------------------------------------------------------------------------------------
# Spectra and bands


def split_period(n: int) -> float:
    """Periods longer than this are the low band: 10 (the decimal period) on long axes, n/2 on short ones
    (on the digit axis 0..9 the low band is the single period-10 wave, k = 1)."""
    return min(10.0, n / 2)


def band_frequencies(n: int, band: str) -> list[int]:
    """The frequencies k (0..n//2) of a band on a number axis of length `n`.

    `low`: 1 <= k with period n/k > `split_period(n)`; `high`: the other non-zero k; `dc`: k = 0 (a constant
    shift of every number logit, invisible to the softmax); `all`: every k >= 1; `k3`, `k1-4,7`: explicit
    frequencies; `p10`, `p2,5`: explicit periods (n/p must be a whole number).
    """
    top = n // 2
    cut = split_period(n)
    if band == "low":
        return [k for k in range(1, top + 1) if n / k > cut]
    if band == "high":
        return [k for k in range(1, top + 1) if n / k <= cut]
    if band == "dc":
        return [0]
    if band == "all":
        return list(range(1, top + 1))
    m = re.fullmatch(r"([kp])([0-9.,\-]+)", band)
    if m is None:
        raise ArithInterpError(
            f"unknown frequency band {band!r}; use low, high, dc, all, k<freqs> (e.g. k1-3,5) "
            "or p<periods> (e.g. p10,5)."
        )
    out: list[int] = []
    for item in m[2].split(","):
        if m[1] == "k":
            lo, _, hi = item.partition("-")
            try:
                out += list(range(int(lo), int(hi or lo) + 1))
            except ValueError:
                raise ArithInterpError(f"band {band!r}: {item!r} is not a frequency or range like 1-3.") from None
        else:
            try:
                k = n / float(item)
            except (ValueError, ZeroDivisionError):
                raise ArithInterpError(f"band {band!r}: {item!r} is not a period.") from None
            if abs(k - round(k)) > 1e-9:
                raise ArithInterpError(
                    f"band {band!r}: period {item} is not n/k for a whole k on an axis of n={n} numbers; "
                    "pick a period that divides n or use k<freq>."
                )
            out.append(round(k))
    bad = [k for k in out if not 0 <= k <= top]
    if bad or not out:
        raise ArithInterpError(f"band {band!r} has frequencies {bad or out} outside 0..{top} for n={n} numbers.")
    return sorted(set(out))


def _freq_weights(n: int) -> Tensor:
    """Parseval weights of the rfft bins: 1 for k = 0 (and k = n/2 when n is even), 2 otherwise."""
    w = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


@dataclass(kw_only=True)
class Spectrum:
    """Power of a signal along the number axis, by frequency k = 0..N//2 (period N/k), averaged over examples.

    `power[..., k]` is the mean of |F_k|^2 / N over the averaged axis, weighted so that it sums over k to the
    mean squared signal (Parseval). `magnitude` is its square root per bin (RMS |F_k|).
    """

    n: int
    power: Float[Tensor, "... freq"]

    @property
    def freqs(self) -> list[int]:
        return list(range(self.n // 2 + 1))

    @property
    def periods(self) -> list[float]:
        return [float("inf") if k == 0 else self.n / k for k in self.freqs]

    @property
    def magnitude(self) -> Tensor:
        return (self.power * self.n**2 / _freq_weights(self.n).to(self.power.dtype)).sqrt()

    def band_fraction(self, band: str) -> Tensor:
        """Share of the non-constant energy (k >= 1) that lies in `band`."""
        ks = band_frequencies(self.n, band)
        ac = self.power[..., 1:].sum(-1)
        return self.power[..., [k for k in ks if k > 0]].sum(-1) / ac.clamp_min(1e-30)

    def record(self, top: int = 3) -> dict[str, Any]:
        """JSON record of a single spectrum (no leading axes)."""
        if self.power.dim() != 1:
            raise ArithInterpError("Spectrum.record needs a single spectrum; index the leading axes first.")
        ac = self.power[1:]
        order = (ac.argsort(descending=True)[:top] + 1).tolist()
        return {
            "n": self.n, "freqs": self.freqs, "periods": [None if p == float("inf") else p for p in self.periods],
            "power": self.power.tolist(), "low_fraction": float(self.band_fraction("low")),
            "high_fraction": float(self.band_fraction("high")),
            "top_periods": [self.n / k for k in order],
        }  # fmt: skip


def spectrum(signal: Float[Tensor, "... batch number"], *, average: bool = True) -> Spectrum:
    """DFT of `signal` along its last (number) axis; power averaged over the batch axis when `average`."""
    n = signal.shape[-1]
    f = torch.fft.rfft(signal.double(), dim=-1)  # (..., batch, freq)
    power = f.abs() ** 2 * _freq_weights(n) / n**2
    return Spectrum(n=n, power=(power.mean(-2) if average else power).float())


def answer_coherence(
    signal: Float[Tensor, "... batch number"], answer: Int[Tensor, " batch"]
) -> Float[Tensor, "... freq"]:
    """How much each frequency of the signal moves with the answer: a complex ratio per k.

    Each example's coefficient F_k is phase-shifted by its answer a (as if the number axis were rotated so the
    answer sits at 0) and averaged: r_k = mean(F_k e^{2 pi i k a / N}) / mean(|F_k|). |r_k| = 1 when every
    example writes the same wave relative to its answer (a feature of the answer), ~0 when phases are unrelated
    to it; angle(r_k) = 0 means the wave peaks exactly at the answer. Examples with answer -1 are left out.
    """
    keep = answer >= 0
    n = signal.shape[-1]
    f = torch.fft.rfft(signal[..., keep, :].double(), dim=-1)  # (..., batch, freq)
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    rot = torch.exp(2j * torch.pi * k[None, :] * answer[keep].double()[:, None] / n)  # (batch, freq)
    return (f * rot).mean(-2) / f.abs().mean(-2).clamp_min(1e-30)


def remove_band(signal: Float[Tensor, "... number"], freqs: list[int]) -> Float[Tensor, "... number"]:
    """`signal` with the Fourier coefficients of `freqs` set to zero (the band removed in number space)."""
    f = torch.fft.rfft(signal.double(), dim=-1)
    f[..., freqs] = 0
    return torch.fft.irfft(f, n=signal.shape[-1], dim=-1).to(signal.dtype)


def band_rows(n: int, freqs: list[int]) -> Float[Tensor, "rows number"]:
    """The real DFT rows of `freqs`: cos(2 pi k m / n) and sin(2 pi k m / n) (all-zero sine rows dropped).

    A vector over the number axis has no energy at the frequencies `freqs` exactly when these rows map it to 0.
    """
    m = torch.arange(n, dtype=torch.float64)
    rows = []
    for k in freqs:
        rows.append(torch.cos(2 * torch.pi * k * m / n))
        if 0 < k and 2 * k != n:
            rows.append(torch.sin(2 * torch.pi * k * m / n))
    return torch.stack(rows)


def band_projector(read: Float[Tensor, "d_model number"], freqs: list[int]) -> Float[Tensor, "d_model d_model"]:
    """Orthogonal projector P onto the row space of A = band_rows @ read^T.

    For a residual-space vector x, `x - P x` is the closest vector (least change in norm) whose number-logit
    read-out `read^T x` has zero coefficients at `freqs`: the projection onto the null space of A.
    """
    a = band_rows(read.shape[1], freqs) @ read.double().T  # (rows, d_model)
    return (torch.linalg.pinv(a, rtol=1e-10) @ a).to(read.dtype)


# ---------------------------------------------------------------------------------------------------------
# Spectra of the model's components


@dataclass(kw_only=True)
class ComponentSpectra:
    """Spectra of the number-token logits each part writes (DLA to every number token), over examples.

    `names` label the rows of `spectrum.power`: every part of the decomposition (heads, MLPs, ...), the
    layer sums `ATTN{l}` (heads + bias) and the totals `attn` (all layers) and `mlp`, and `final` (the model's
    number-token logits, the sum of all parts).
    """

    numbers: NumberTokens
    names: list[str]
    spectrum: Spectrum
    signals: Float[Tensor, "row batch number"]  # the number-token logits each row writes, per example

    def get(self, name: str) -> Spectrum:
        return Spectrum(n=self.spectrum.n, power=self.spectrum.power[self.names.index(name)])

    def record(self, names: list[str] | None = None) -> dict[str, Any]:
        return {n: self.get(n).record() for n in (names or self.names)}

    def coherence_record(self, answer: Int[Tensor, " batch"], names: list[str] | None = None) -> dict[str, Any]:
        """`answer_coherence` of each row for k >= 1: `{name: {"coherence": [...], "peak_offset": [...]}}`,
        the peak offset in numbers (0: the wave peaks at the answer). `answer` is the answer's number."""
        r = answer_coherence(self.signals, answer)[:, 1:]  # (row, freq >= 1)
        k = torch.arange(1, r.shape[1] + 1, dtype=torch.float64)
        offset = -torch.angle(r) * self.spectrum.n / (2 * torch.pi * k)
        return {name: {"coherence": r[i].abs().tolist(), "peak_offset": offset[i].tolist()}
                for i, name in enumerate(self.names) if names is None or name in names}  # fmt: skip


def _grouped_signals(decomposition: Decomposition, contrib: Tensor) -> tuple[list[str], Tensor]:
    """Per-part signals plus layer and site sums and the final total: (names, [row, batch, number])."""
    parts = decomposition.parts
    names = [p.name for p in parts]
    rows = [contrib[i] for i in range(len(parts))]
    layers = sorted({p.layer for p in parts if p.layer is not None})
    for layer in layers:
        idx = [i for i, p in enumerate(parts) if p.layer == layer and p.kind in ("head", "attn_bias")]
        names.append(f"ATTN{layer}")
        rows.append(contrib[idx].sum(0))
    for site, kinds in (("attn", ("head", "attn_bias")), ("mlp", ("mlp",))):
        names.append(site)
        rows.append(contrib[[i for i, p in enumerate(parts) if p.kind in kinds]].sum(0))
    names.append("final")
    rows.append(contrib.sum(0))  # includes ln_final.b: the model's number-token logits
    return names, torch.stack(rows)


@torch.no_grad()
def component_spectra(
    model,
    dataset: Dataset,
    *,
    numbers: NumberTokens | None = None,
    decomposition: Decomposition | None = None,
    weights: _gpt2.GPT2Weights | None = None,
) -> ComponentSpectra:
    """Spectra of what every part of the final-position residual writes to the number-token logits.

    Pass a `decomposition` of `dataset.clean_tokens` to reuse one run, and the model's `weights`
    (`attribution.gpt2_weights`) to reuse one copy of them.
    """
    w = gpt2_weights(model, weights, what=_WHAT)
    d = decomposition or decompose_residual(model, dataset.clean_tokens, weights=w)
    return spectra_of_decomposition(model, d, numbers=numbers, weights=w)


@torch.no_grad()
def spectra_of_decomposition(
    model, d: Decomposition, *, numbers: NumberTokens | None = None, weights: _gpt2.GPT2Weights | None = None
) -> ComponentSpectra:
    """`component_spectra` of an existing residual decomposition (any prompts, any position)."""
    numbers = numbers or number_tokens(model.tokenizer)
    w = gpt2_weights(model, weights, what=_WHAT)
    contrib = part_contributions(d, w, numbers.ids)  # (component incl. ln_final.b, batch, number)
    names, signals = _grouped_signals(d, contrib[:-1])
    signals[-1] += contrib[-1]  # the final logits include the layer-norm bias
    return ComponentSpectra(numbers=numbers, names=names, spectrum=spectrum(signals), signals=signals)


@torch.no_grad()
def embedding_spectrum(
    model, *, numbers: NumberTokens | None = None, weights: _gpt2.GPT2Weights | None = None
) -> dict[str, Spectrum]:
    """Spectra of the number tokens' embedding rows `W_E[ids]` and unembedding columns `W_U[:, ids]`, each
    d_model coordinate a signal along the number axis, power averaged over d_model."""
    numbers = numbers or number_tokens(model.tokenizer)
    w = gpt2_weights(model, weights, what=_WHAT)
    return {"W_E": spectrum(w.W_E[numbers.ids].T), "W_U": spectrum(w.W_U[:, numbers.ids])}


# ---------------------------------------------------------------------------------------------------------
# Fourier filters as interventions


@dataclass(frozen=True, kw_only=True)
class FourierFilter:
    """Remove frequency `band` from the attention (`site="attn"`) or MLP outputs of `layers` (None = all)."""

    site: Literal["attn", "mlp"]
    band: str
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.site not in ("attn", "mlp"):
            raise ArithInterpError(f"filter site {self.site!r} is not attn or mlp; write e.g. attn:high or mlp1:low.")
        if self.band not in ("low", "high", "dc", "all") and not re.fullmatch(r"[kp][0-9.,\-]+", self.band):
            raise ArithInterpError(
                f"unknown frequency band {self.band!r}; use low, high, dc, all, k<freqs> (e.g. k1-3) or p<periods>."
            )

    @property
    def name(self) -> str:
        where = self.site + (",".join(map(str, self.layers)) if self.layers is not None else "")
        return f"{where}:{self.band}"

    @classmethod
    def parse(cls, spec: str) -> FourierFilter:
        """`attn:high`, `mlp:low`, `mlp1:low` (layer 1 only), `attn0,2:k1-3`, `mlp:p10`."""
        m = re.fullmatch(r"(attn|mlp)([0-9,]*):(\S+)", spec.strip())
        if m is None:
            raise ArithInterpError(
                f"filter {spec!r} is not SITE[LAYERS]:BAND; write e.g. attn:high, mlp:low, mlp1:low or attn:k1-3."
            )
        layers = tuple(int(x) for x in m[2].split(",") if x) or None
        return cls(site=m[1], band=m[3], layers=layers)  # type: ignore[arg-type]

    def layers_in(self, n_layers: int) -> tuple[int, ...]:
        """The layers filtered in a model of `n_layers` layers; a layer it does not have is an error."""
        layers = self.layers if self.layers is not None else tuple(range(n_layers))
        for layer in layers:
            if not 0 <= layer < n_layers:
                raise ArithInterpError(f"filter {self.name}: layer {layer} is out of range 0..{n_layers - 1}.")
        return layers

    def frequencies(self, numbers: NumberTokens) -> list[int]:
        """The frequencies removed on the number axis `numbers`; a band that does not fit it is an error."""
        return band_frequencies(numbers.n, self.band)

    def hooks(self, model, numbers: NumberTokens, *, weights: _gpt2.GPT2Weights | None = None) -> list[tuple[str, Any]]:
        """transformer-lens forward hooks that apply the filter at every position (pass the model's `weights`
        to reuse one copy of them)."""
        w = gpt2_weights(model, weights, what=_WHAT)
        layers = self.layers_in(w.n_layers)
        freqs = self.frequencies(numbers)
        proj = band_projector(effective_unembed(w, numbers.ids), freqs)  # (d_model, d_model), symmetric

        def hook(x: Tensor, hook=None) -> Tensor:
            return x - x @ proj.to(x.dtype)

        point = "hook_attn_out" if self.site == "attn" else "hook_mlp_out"
        return [(f"blocks.{layer}.{point}", hook) for layer in layers]


@torch.no_grad()
def greedy_decode(
    model, prompts: Int[Tensor, "batch pos"], n_tokens: int, *, fwd_hooks=(), batch_size: int = 256
) -> Int[Tensor, "batch n_tokens"]:
    """Greedy continuation by `n_tokens` tokens with `fwd_hooks` active at every step."""
    outs = []
    for i in range(0, prompts.shape[0], batch_size):
        seq = prompts[i : i + batch_size]
        for _ in range(n_tokens):
            logits = model.run_with_hooks(seq, fwd_hooks=list(fwd_hooks)) if fwd_hooks else model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        outs.append(seq[:, prompts.shape[1] :])
    return torch.cat(outs)


@dataclass(kw_only=True)
class FilterResult:
    """Whole answers decoded with a filter active: accuracy and the errors (predicted - true, None if the
    output is not a number)."""

    name: str
    freqs: list[int]
    accuracy: float
    token_accuracy: float  # share of answer tokens right (digit accuracy for digit models)
    errors: list[int | None] = field(default_factory=list)

    def histogram(self) -> dict[str, int]:
        """Counts of each error value ("none" for non-numbers), most common first."""
        c = Counter("none" if e is None else str(e) for e in self.errors)
        return dict(c.most_common())

    def error_classes(self) -> dict[str, float]:
        """Shares of: correct, off by exactly +-10**j (j >= 1: a decimal place shifted), off by 1..9, other."""
        n = max(len(self.errors), 1)
        pow10 = lambda e: e != 0 and abs(e) >= 10 and abs(e) == 10 ** (len(str(abs(e))) - 1)  # noqa: E731
        counts = {"correct": 0, "pm_power_of_10": 0, "small": 0, "other": 0, "not_a_number": 0}
        for e in self.errors:
            key = ("not_a_number" if e is None else "correct" if e == 0 else "pm_power_of_10" if pow10(e)
                   else "small" if abs(e) < 10 else "other")  # fmt: skip
            counts[key] += 1
        return {k: v / n for k, v in counts.items()}

    def record(self) -> dict[str, Any]:
        return {"filter": self.name, "freqs": self.freqs, "accuracy": self.accuracy,
                "token_accuracy": self.token_accuracy, "error_classes": self.error_classes(),
                "error_histogram": self.histogram()}  # fmt: skip


def _parse_answer(text: str, style: str) -> int | None:
    s = text.strip()
    if style == "digits":
        s = s[::-1]  # the built-in models write the answer least significant digit first
    return int(s) if s.isdigit() else None


@torch.no_grad()
def evaluate_filters(
    model,
    dataset: Dataset,
    filters: list[FourierFilter],
    *,
    numbers: NumberTokens | None = None,
    include_baseline: bool = True,
    progress: bool = False,
    weights: _gpt2.GPT2Weights | None = None,
) -> list[FilterResult]:
    """Greedy-decode every example's whole answer with each filter active (and without, as a baseline).

    The prompt is the clean prompt without any teacher-forced answer tokens, so every answer token is the
    model's own; the errors are predicted minus true answer. Every filter is checked against the model and
    the number axis before the first decode.
    """
    if dataset.token_set is not None or any("result" not in e.meta for e in dataset.examples):
        raise ArithInterpError("Fourier filters need an arithmetic task (add, sub, mul, div) with a numeric result.")
    numbers = numbers or number_tokens(model.tokenizer)
    tok = model.tokenizer
    k = dataset.config.answer_token
    prompts = dataset.clean_tokens[:, : dataset.clean_tokens.shape[1] - k]
    truth = [tok.encode(e.full_answer, add_special_tokens=False) for e in dataset.examples]
    n_tokens = max(len(t) for t in truth)
    w = gpt2_weights(model, weights, what=_WHAT) if filters else None
    todo: list[tuple[str, list[int], Any]] = [("none", [], ())] if include_baseline else []  # (name, freqs, hooks)
    for f in filters:
        hooks = f.hooks(model, numbers, weights=w)  # checks the layers, then the band
        todo.append((f.name, f.frequencies(numbers), hooks))
    results = []
    for name, freqs, hooks in tqdm(todo, desc="filters", disable=not progress):
        out = greedy_decode(model, prompts, n_tokens, fwd_hooks=hooks)
        errors, exact, right, total = [], 0, 0, 0
        for i, (ex, t) in enumerate(zip(dataset.examples, truth)):
            pred = out[i, : len(t)].tolist()
            value = _parse_answer(tok.decode(pred), dataset.style)
            errors.append(None if value is None else value - ex.meta["result"])
            exact += pred == t
            right += sum(p == q for p, q in zip(pred, t))
            total += len(t)
        results.append(FilterResult(name=name, freqs=freqs, accuracy=exact / len(dataset), token_accuracy=right / total,
                                    errors=errors))  # fmt: skip
    return results


@torch.no_grad()
def answer_digit_spectra(model, dataset: Dataset, *, numbers: NumberTokens | None = None) -> list[dict[str, Any]]:
    """The spectrum of the final number-token logits at every answer token position, on `dataset`'s examples.

    For answer token j the prompt is extended by the true answer tokens before it (teacher forcing). For the
    digit models the records carry the place value 10**j (the answer is written least significant digit
    first), so this is the spectrum over the answer digits, units first.
    """
    numbers = numbers or number_tokens(model.tokenizer)
    tok = model.tokenizer
    k = dataset.config.answer_token
    prompts = dataset.clean_tokens[:, : dataset.clean_tokens.shape[1] - k]
    truth = [tok.encode(e.full_answer, add_special_tokens=False) for e in dataset.examples]
    n_tokens = min(len(t) for t in truth)
    answers = torch.tensor([t[:n_tokens] for t in truth], dtype=torch.long)
    tokens = torch.cat([prompts, answers[:, : n_tokens - 1]], 1)  # one run, read at every answer position
    p0 = prompts.shape[1] - 1
    logits = model(tokens)[:, p0 : p0 + n_tokens][..., numbers.ids]  # (batch, answer token, number)
    return [{"answer_token": j, "place": 10**j if dataset.style == "digits" else None}
            | spectrum(logits[:, j]).record() for j in range(n_tokens)]  # fmt: skip
