"""Patching metrics, read at the final position, per example.

A `Metric` maps final-position logits `[..., batch, columns]` to one value per example `[..., batch]`.
`columns` lists the vocabulary ids the metric reads (None: the whole vocabulary), so an engine may compute
only those logits. Every metric here is oriented so that the clean run scores higher than the corrupted one
(KL is negated), which lets one normalisation serve all of them::

    score = (M_patched - M_corrupted) / (M_clean - M_corrupted)      # 0 = corrupted, 1 = clean

where M is the mean over examples. `normalise` and `bootstrap_ci` implement that with a confidence interval
from resampling examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from arithinterp._errors import ArithInterpError
from arithinterp.tasks import Dataset

METRICS = ("logit_diff", "answer_logit", "prob_diff", "accuracy", "kl")


@dataclass(frozen=True, kw_only=True)
class Metric:
    name: str
    columns: Tensor | None  # vocabulary ids read; None = all
    fn: Callable[[Tensor], Tensor]  # [..., batch, columns] -> [..., batch]
    description: str

    def __call__(self, logits: Float[Tensor, "... batch columns"]) -> Float[Tensor, "... batch"]:
        return self.fn(logits)

    def from_full_logits(self, logits: Float[Tensor, "... batch d_vocab"]) -> Float[Tensor, "... batch"]:
        """The metric from full-vocabulary final-position logits."""
        return self.fn(logits if self.columns is None else logits[..., self.columns])


def make_metric(name: str, dataset: Dataset, clean_logits: Tensor | None = None) -> Metric:
    """Build metric `name` for `dataset`. `kl` needs the clean run's final-position logits."""
    batch = torch.arange(len(dataset))
    if name == "logit_diff":
        if not dataset.has_counterfactual_answer:
            raise ArithInterpError(
                f"metric logit_diff needs a counterfactual answer, which counterfactual "
                f"{dataset.config.counterfactual!r} does not have; use --metric answer_logit or "
                "--counterfactual operand."
            )
        cols, inv = torch.unique(torch.cat([dataset.answer_ids, dataset.counterfactual_ids]), return_inverse=True)
        a, c = inv[: len(dataset)], inv[len(dataset) :]
        return Metric(
            name=name, columns=cols, fn=lambda lg: lg[..., batch, a] - lg[..., batch, c],
            description="answer logit minus counterfactual-answer logit",
        )  # fmt: skip
    if name == "answer_logit":
        cols, a = torch.unique(dataset.answer_ids, return_inverse=True)
        return Metric(name=name, columns=cols, fn=lambda lg: lg[..., batch, a], description="answer logit")
    if name == "prob_diff":
        if dataset.token_set is None:
            raise ArithInterpError("metric prob_diff needs a task scored over a token set (greater-than).")
        ts, pos = dataset.token_set, dataset.positive.float()

        def prob_diff(lg: Tensor) -> Tensor:
            p = lg.softmax(-1)[..., ts]  # (..., batch, set)
            return (p * pos).sum(-1) - (p * (1 - pos)).sum(-1)

        return Metric(name=name, columns=None, fn=prob_diff,
                      description="P(year > start) - P(year <= start) over the 100 two-digit years")  # fmt: skip
    if name == "accuracy":
        return Metric(name=name, columns=None, fn=lambda lg: (lg.argmax(-1) == dataset.answer_ids).float(),
                      description="greedy answer token is correct")  # fmt: skip
    if name == "kl":
        if clean_logits is None:
            raise ArithInterpError("metric kl needs the clean run's logits.")
        clean_lp = clean_logits.log_softmax(-1)

        def neg_kl(lg: Tensor) -> Tensor:
            lp = lg.log_softmax(-1)
            return -(clean_lp.exp() * (clean_lp - lp)).sum(-1)

        return Metric(name=name, columns=None, fn=neg_kl, description="minus KL(clean || patched)")
    raise ArithInterpError(f"unknown metric {name!r}; choose one of: {', '.join(METRICS)}.")


def normalise(
    patched: Float[Tensor, "... batch"], clean: Float[Tensor, " batch"], corrupted: Float[Tensor, " batch"]
) -> Float[Tensor, "..."]:
    """(mean patched - mean corrupted) / (mean clean - mean corrupted)."""
    c, k = corrupted.mean(), clean.mean()
    return (patched.mean(-1) - c) / (k - c)


def bootstrap_ci(
    patched: Float[Tensor, "component batch"],
    clean: Float[Tensor, " batch"],
    corrupted: Float[Tensor, " batch"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval of the normalised score, resampling examples (same draws for all)."""
    idx = _resample(clean.shape[0], n_boot, seed)  # (boot, batch)
    c, k = corrupted[idx].mean(-1), clean[idx].mean(-1)  # (boot,)
    p = patched[:, idx].mean(-1)  # (component, boot)
    return _percentiles((p - c) / (k - c), level)


def mean_ci(
    values: Float[Tensor, "component batch"], *, level: float = 0.95, n_boot: int = 1000, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean over examples with a percentile-bootstrap interval (examples resampled, same draws for all rows)."""
    boot = values[:, _resample(values.shape[1], n_boot, seed)].mean(-1)  # (component, boot)
    lo, hi = _percentiles(boot, level)
    return values.mean(1), lo, hi


def _resample(n: int, n_boot: int, seed: int) -> Tensor:
    """`n_boot` bootstrap draws of `n` example indices, `(boot, n)` (seeded: every caller draws the same)."""
    return torch.randint(0, n, (n_boot, n), generator=torch.Generator().manual_seed(seed))


def _percentiles(boot: Float[Tensor, "... boot"], level: float) -> tuple[Tensor, Tensor]:
    """The central `level` percentile interval over the last axis."""
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=boot.dtype)
    lo, hi = torch.quantile(boot, q, dim=-1)
    return lo, hi


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 with ties given their average rank."""
    x = x.double()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for v in x.unique():  # average the ranks of tied values
        tied = x == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman's rank correlation of two score vectors (average ranks for ties; NaN if either is constant)."""
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ArithInterpError(
            f"spearman needs two 1-d tensors of one length >= 2, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float("nan") if denom == 0 else float((ra * rb).sum() / denom)
