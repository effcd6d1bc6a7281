"""Linear probes, Fourier digit-basis fits and PCA views of stored activations.

A linear probe asks whether a quantity (a digit of an operand, a carry, the answer digit, an operand's value,
a partial product, a running sum) can be read off an activation by a linear map. Two things can make the
answer misleading, and this module guards against both:

* **Fitting is not reading.** Scores are held-out: K-fold cross-validation over examples (each example is one
  row, so no example is in both the training and the test fold).
* **Capacity.** A probe with many features fits a lot on few examples. Every probe is run again on a
  *control*: the same features with the labels shuffled (`"shuffle"`), and/or Gaussian features of the same
  shape with the true labels (`"random"`). A readable quantity scores far above its control; the control
  sits at chance (the majority-class rate for classification, R² = 0 for regression).

Targets are named by the examples' metadata (`Example.meta`), so a new field needs no code here:
`"a"`, `"result"`, `"a_digits[0]"` (the units digit: index i is the 10**i place), `"carries[1]"`,
`"result_digits[2]"`, `"partial_products[1][2]"`, `"counterfactual.result"`. Integer targets with at most
`MAX_CLASSES` distinct values are classified (held-out accuracy); others are regressed (held-out R²).

**Fourier digit basis.** Models that add often represent a digit n by features periodic in n (Nanda et al.
2023; Zhou et al. 2024). `fourier_fit` fits representations labelled by digit — embedding rows, per-digit
mean MLP outputs or residual states — with the basis {1, cos 2πn/10, sin 2πn/10, cos 2πn/5, sin 2πn/5,
(-1)^n} (periods 10, 5 and 2) and with the full basis of all ten functions of n, reporting R² per row, per
dimension, their medians, and the spectrum (share of variance at each frequency). With one row per digit the
full basis fits exactly (R² = 1); a random basis of the same size explains 5/9 of a structureless code, which
is the chance level the Fourier fit must beat. `pca` gives 2-D views.

Probes are small (thousands of rows, hundreds of features), where BLAS threads cost more than they save and
oversubscribe a shared CPU; fits run with one BLAS thread.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, get_args

import numpy as np
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from arithinterp._errors import ArithInterpError
from arithinterp.fourier import band_rows

MAX_CLASSES = 20
#: Frequencies k of cos/sin(2πkn/10) in the Fourier digit basis: periods 10, 5 and 2 (k = 5 is (-1)^n).
FOURIER_FREQUENCIES = (1, 2, 5)
Control = Literal["shuffle", "random", "both"]
ProbeKind = Literal["auto", "classification", "regression"]
Estimator = Literal["logistic", "ridge"]


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """How probes are fitted and checked."""

    kind: ProbeKind = "auto"  # auto: integers with <= 20 values classify
    estimator: Estimator = "logistic"  # classifier; "ridge" (least squares) is ~10x faster
    folds: int = 5  # K of the K-fold cross-validation over examples
    control: Control = "shuffle"  # shuffled labels, random features, or both
    max_examples: int | None = 2000  # a fixed random subset keeps each fit fast; None uses every example
    regularization: float = 1.0  # C of the logistic probe (smaller = stronger); alpha of the ridge probe
    seed: int = 0  # folds, shuffles, random features and the subset

    def __post_init__(self) -> None:
        if self.kind not in get_args(ProbeKind):
            raise ArithInterpError(f"kind={self.kind!r} must be auto, classification or regression.")
        if self.folds < 2:
            raise ArithInterpError(f"folds={self.folds} must be >= 2 for held-out scores.")
        if self.control not in get_args(Control):
            raise ArithInterpError(f"control={self.control!r} must be shuffle, random or both.")
        if self.max_examples is not None and self.max_examples < 2 * self.folds:
            raise ArithInterpError(f"max_examples={self.max_examples} leaves too few examples for {self.folds} "
                                   "folds; pass a larger number or None.")  # fmt: skip
        if self.estimator not in get_args(Estimator):
            raise ArithInterpError(f"estimator={self.estimator!r} must be logistic or ridge.")
        if not self.regularization > 0:
            raise ArithInterpError(f"regularization={self.regularization} must be > 0.")

    @property
    def controls(self) -> tuple[str, ...]:
        return ("shuffle", "random") if self.control == "both" else (self.control,)


# ---------------------------------------------------------------------------------------------------------
# Targets

_TARGET_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(\[-?\d+\])*$")


def target_values(source, name: str) -> np.ndarray:
    """The value of target `name` for every example of `source` (an `ActivationStore`, a `Dataset` or a
    list of metadata dicts), as a 1-D array.

    `name` is a metadata key, with `.key` for nested dicts and `[i]` for list items: `"a_digits[0]"`,
    `"partial_products[1][2]"`, `"counterfactual.a"`. Top-level example fields (`"answer"`) work too.
    """
    records = _records(source)
    if not _TARGET_RE.match(name):
        raise ArithInterpError(f"target {name!r} is not a metadata key like 'a', 'a_digits[0]' or 'carries[1]'.")
    path = re.findall(r"[A-Za-z_]\w*|\[-?\d+\]", name)
    values = []
    for i, (meta, record) in enumerate(records):
        head = path[0]
        if head in meta:
            obj = meta[head]
        elif record is not None and head in record and head != "meta":
            obj = record[head]
        else:
            keys = sorted(set(meta) | (set(record) - {"meta"} if record else set()))
            raise ArithInterpError(f"target {name!r}: the examples have no field {head!r}; "
                                   f"available: {', '.join(keys)}.")  # fmt: skip
        for step in path[1:]:
            try:
                obj = obj[int(step[1:-1])] if step.startswith("[") else obj[step]
            except (IndexError, KeyError, TypeError) as exc:
                raise ArithInterpError(f"target {name!r} does not exist in example {i} (at {step!r}: {obj!r}); "
                                       "check the index against the metadata.") from exc  # fmt: skip
        if isinstance(obj, str) and re.fullmatch(r"-?\d+", obj):
            obj = int(obj)
        if isinstance(obj, bool):
            obj = int(obj)
        if not isinstance(obj, (int, float)):
            raise ArithInterpError(f"target {name!r} is {type(obj).__name__} ({obj!r}), not a number; "
                                   "name a numeric field, or index into a list with [i].")  # fmt: skip
        values.append(obj)
    return np.asarray(values)


def _records(source) -> list[tuple[dict, dict | None]]:
    if hasattr(source, "examples") and source.examples and isinstance(source.examples[0], dict):  # store
        return [(r["meta"], r) for r in source.examples]
    if hasattr(source, "examples"):  # Dataset
        return [(e.meta, {"answer": e.answer, "full_answer": e.full_answer}) for e in source.examples]
    return [(m, None) for m in source]


def target_kind(values: np.ndarray, kind: str = "auto") -> str:
    """Classification for integer targets with at most `MAX_CLASSES` values, else regression."""
    if kind != "auto":
        if kind == "classification" and not _is_integer(values):
            raise ArithInterpError("classification needs integer targets; use kind='regression' for this one.")
        return kind
    return "classification" if _is_integer(values) and len(np.unique(values)) <= MAX_CLASSES else "regression"


def _is_integer(values: np.ndarray) -> bool:
    return np.issubdtype(values.dtype, np.integer) or bool(np.all(np.mod(values, 1) == 0))


# ---------------------------------------------------------------------------------------------------------
# One probe


@dataclass(frozen=True, kw_only=True)
class ProbeScore:
    """Held-out score of one probe (mean over folds) and of its controls."""

    kind: str
    metric: str  # "accuracy" or "r2"
    score: float
    std: float  # across folds
    control: dict[str, float]
    chance: float  # majority-class rate (classification) or 0 (regression)
    n: int


def _estimator(kind: str, config: ProbeConfig):
    from sklearn.linear_model import LogisticRegression, Ridge, RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "regression":
        return make_pipeline(StandardScaler(), Ridge(alpha=config.regularization))
    if config.estimator == "ridge":
        return make_pipeline(StandardScaler(), RidgeClassifier(alpha=config.regularization))
    return make_pipeline(StandardScaler(), LogisticRegression(C=config.regularization, max_iter=1000))


def _folds(kind: str, y: np.ndarray, folds: int, seed: int):
    from sklearn.model_selection import KFold, StratifiedKFold

    if kind == "classification" and np.unique(y, return_counts=True)[1].min() >= folds:
        return StratifiedKFold(folds, shuffle=True, random_state=seed)
    return KFold(folds, shuffle=True, random_state=seed)


def _cv(kind: str, X: np.ndarray, y: np.ndarray, config: ProbeConfig) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import r2_score

    scores = []
    for train, test in _folds(kind, y, config.folds, config.seed).split(X, y):
        if kind == "classification" and len(np.unique(y[train])) == 1:
            scores.append(float(np.mean(y[test] == y[train][0])))
            continue
        est = _estimator(kind, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X[train], y[train])
        pred = est.predict(X[test])
        scores.append(float(np.mean(pred == y[test])) if kind == "classification" else float(r2_score(y[test], pred)))
    return np.asarray(scores)


def probe(X: Float[np.ndarray, "example feature"], y: np.ndarray, config: ProbeConfig | None = None) -> ProbeScore:
    """Cross-validated linear probe of `y` from `X`, with its control(s)."""
    from threadpoolctl import threadpool_limits

    config = config or ProbeConfig()
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    y = np.asarray(y)
    if len(X) != len(y):
        raise ArithInterpError(f"probe features have {len(X)} rows but the target has {len(y)} values.")
    if len(y) < 2 * config.folds:
        raise ArithInterpError(f"{len(y)} examples are too few for {config.folds}-fold probes; use more examples.")
    kind = target_kind(y, config.kind)
    if kind == "classification":
        y = y.astype(np.int64)
        chance = float(np.unique(y, return_counts=True)[1].max() / len(y))
    else:
        y = y.astype(np.float64)
        chance = 0.0
    rng = np.random.default_rng(config.seed)
    with threadpool_limits(1):
        if kind == "regression" and np.ptp(y) == 0:
            raise ArithInterpError("the regression target is constant over these examples; probe another target.")
        scores = _cv(kind, X, y, config)
        control = {}
        for c in config.controls:
            if c == "shuffle":
                control[c] = float(_cv(kind, X, rng.permutation(y), config).mean())
            else:
                control[c] = float(_cv(kind, rng.standard_normal(X.shape), y, config).mean())
    return ProbeScore(kind=kind, metric="accuracy" if kind == "classification" else "r2", score=float(scores.mean()),
                      std=float(scores.std()), control=control, chance=chance, n=len(y))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Probes over a store


@dataclass(kw_only=True)
class ProbeResult:
    """Probe scores per hook and stored position: `score[hook, pos]`, `control[name][hook, pos]`."""

    target: str
    kind: str
    metric: str
    hooks: list[str]
    positions: list[int]
    position_labels: list[str]
    score: np.ndarray  # [hook, pos]
    std: np.ndarray
    control: dict[str, np.ndarray]
    chance: float
    n_examples: int
    config: ProbeConfig
    classes: list[int] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """One JSON record per (hook, position)."""
        out = []
        for h, hook in enumerate(self.hooks):
            for p, pos in enumerate(self.positions):
                out.append({"hook": hook, "layer": hook_label(hook), "position": pos,
                            "token": self.position_labels[p], "score": float(self.score[h, p]),
                            "std": float(self.std[h, p]),
                            "control": {k: float(v[h, p]) for k, v in self.control.items()}})  # fmt: skip
        return out

    def best(self) -> dict[str, Any]:
        h, p = np.unravel_index(int(np.nanargmax(self.score)), self.score.shape)
        return {"hook": self.hooks[h], "position": self.positions[p], "score": float(self.score[h, p])}

    def first_hook(self, threshold: float, position: int) -> str | None:
        """The first hook (in model order) where the score at `position` reaches `threshold`, or None."""
        p = self.positions.index(position)
        for h, hook in enumerate(self.hooks):
            if self.score[h, p] >= threshold:
                return hook
        return None


def hook_label(hook: str) -> str:
    """A short axis label: `embed` for the residual entering block 0, `L{l}` after block l, else the name."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|mid|post)", hook)
    if m is None:
        return hook
    layer, stage = int(m[1]), m[2]
    if stage == "post":
        return f"L{layer}"
    if stage == "pre":
        return "embed" if layer == 0 else f"L{layer - 1}"
    return f"L{layer}.mid"


def probe_rows(n: int, config: ProbeConfig) -> np.ndarray:
    """The examples probes use: all, or a fixed random subset of `config.max_examples` (sorted)."""
    if config.max_examples is None or n <= config.max_examples:
        return np.arange(n)
    return np.sort(np.random.default_rng(config.seed).choice(n, config.max_examples, replace=False))


def probe_store(
    store, target: str, *, hooks: Sequence[str] | None = None, positions: Sequence[int] | None = None,
    config: ProbeConfig | None = None, progress: bool = True,
) -> ProbeResult:  # fmt: skip
    """Probe `target` at every chosen hook and position of `store` (default: all stored)."""
    return _probe_store(store, target, hooks=hooks, positions=positions, config=config, progress=progress)[0]


@dataclass(kw_only=True)
class _Read:
    """What `probe_report` needs of the arrays `probe_store` read, kept so that the store is read once.

    Only small things are kept, not every hook's activations: the features at the best-scoring (hook,
    position), and for a digit target (every digit 0..9 present) the per-digit mean of each (hook, position),
    None where the features are the same for every example.
    """

    y: np.ndarray  # the target on the probed rows (`probe_rows`)
    best: np.ndarray | None = None  # [example, feature] at `ProbeResult.best()`
    digit_means: dict[tuple[int, int], np.ndarray | None] = field(default_factory=dict)  # (hook, pos) -> [digit, d]


def _probe_store(
    store, target: str, *, hooks: Sequence[str] | None, positions: Sequence[int] | None,
    config: ProbeConfig | None, progress: bool,
) -> tuple[ProbeResult, _Read]:  # fmt: skip
    """`probe_store`, and what `probe_report` needs of the arrays it read."""
    config = config or ProbeConfig()
    y_all = target_values(store, target)
    hooks = list(hooks) if hooks is not None else store.hooks
    positions = [p % store.manifest["seq_len"] for p in positions] if positions is not None else store.positions
    rows = probe_rows(store.n, config)
    y = y_all[rows]
    kind = target_kind(y, config.kind)
    read = _Read(y=y)
    is_digit = kind == "classification" and set(np.unique(y).tolist()) == set(range(10))
    best_score = None  # the first largest score, ignoring NaN, as ProbeResult.best picks it (np.nanargmax)
    shape = (len(hooks), len(positions))
    score, std = np.full(shape, np.nan), np.full(shape, np.nan)
    control = {c: np.full(shape, np.nan) for c in config.controls}
    chance = 0.0
    labels = store.manifest["position_labels"]
    with tqdm(total=shape[0] * shape[1], desc=f"probe {target}", disable=not progress) as bar:
        for h, hook in enumerate(hooks):
            acts = store.get(hook, positions=positions, examples=rows)  # [example, pos, ...]
            axis = store.manifest["hooks"][hook]["axes"].index("pos")
            for p in range(len(positions)):
                X = acts.select(axis, p).reshape(len(rows), -1).float().numpy()
                s = probe(X, y, ProbeConfig(**{**config.__dict__, "kind": kind}))
                score[h, p], std[h, p], chance = s.score, s.std, s.chance
                for c, v in s.control.items():
                    control[c][h, p] = v
                if not np.isnan(s.score) and (best_score is None or s.score > best_score):
                    best_score, read.best = s.score, np.ascontiguousarray(X)  # not a view into every position
                if is_digit:
                    read.digit_means[h, p] = None if np.allclose(X, X[0]) else digit_means(X, y)
                bar.update(1)
    classes = sorted(int(c) for c in np.unique(y)) if kind == "classification" else []
    result = ProbeResult(target=target, kind=kind, metric="accuracy" if kind == "classification" else "r2",
                         hooks=hooks, positions=positions,
                         position_labels=[labels[store.positions.index(p)] for p in positions], score=score,
                         std=std, control=control, chance=chance, n_examples=len(rows), config=config,
                         classes=classes)  # fmt: skip
    return result, read


# ---------------------------------------------------------------------------------------------------------
# Fourier digit basis


def fourier_basis(frequencies: Sequence[int] = FOURIER_FREQUENCIES, n: int = 10) -> Float[np.ndarray, "digit basis"]:
    """Columns 1, then cos and sin(2πkn/10) for each k (only cos for k = 5, where sin vanishes: (-1)^n)."""
    return band_rows(n, [0, *frequencies]).T.numpy()


def full_basis(n: int = 10) -> Float[np.ndarray, "digit digit"]:
    """Every frequency k = 0..5: an orthogonal basis of all functions of a digit."""
    return fourier_basis(tuple(range(1, n // 2 + 1)), n)


@dataclass(frozen=True, kw_only=True)
class FourierFit:
    """How well a digit code is explained by the Fourier basis (periods 10, 5, 2) and by the full basis.

    R² per row (each row of the representations: a digit's vector, or an example's) and per dimension
    (each feature as a function of the digit), their medians, the overall R² (share of all variance), the
    spectrum (share of the digit-dependent variance at each frequency k = 1..5, i.e. periods 10, 5, 10/3,
    2.5, 2) and a control: the median row R² of a random basis with as many functions.
    """

    r2_rows: np.ndarray
    r2_rows_full: np.ndarray
    r2_dims: np.ndarray
    r2_dims_full: np.ndarray
    r2: float
    r2_full: float
    median_r2: float  # median over rows, Fourier basis: the headline number
    median_r2_full: float
    median_r2_dims: float
    spectrum: np.ndarray  # [5] for k = 1..5
    control_r2: float  # median row R² of random bases of the same size

    def record(self) -> dict[str, Any]:
        return {"median_r2": self.median_r2, "median_r2_full": self.median_r2_full,
                "median_r2_dims": self.median_r2_dims, "r2": self.r2, "r2_full": self.r2_full,
                "control_r2": self.control_r2, "r2_rows": self.r2_rows.tolist(),
                "r2_rows_full": self.r2_rows_full.tolist(),
                "spectrum": {f"k={k} (period {10 / k:g})": float(v)
                             for k, v in enumerate(self.spectrum, 1)}}  # fmt: skip


def _fit_r2(reps: np.ndarray, design: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    coef, *_ = np.linalg.lstsq(design, reps, rcond=None)
    resid = reps - design @ coef
    centred = reps - reps.mean(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = 1 - (resid**2).sum(1) / (centred**2).sum(1)
        dims = 1 - (resid**2).sum(0) / (centred**2).sum(0)
    return rows, dims, float(1 - (resid**2).sum() / (centred**2).sum())


def fourier_fit(
    reps: Float[np.ndarray, "row d"] | torch.Tensor, digits: Int[np.ndarray, " row"] | Sequence[int] | None = None,
    *, frequencies: Sequence[int] = FOURIER_FREQUENCIES, n_control: int = 20, seed: int = 0,
) -> FourierFit:  # fmt: skip
    """Fit representations labelled by digit with the Fourier basis and with the full basis.

    `reps[i]` is the representation of digit `digits[i]` (default `digits = 0..9`, one row per digit, e.g.
    the digit tokens' embedding rows). Rows are fitted as a function of their digit.
    """
    reps = np.asarray(reps.detach().float().cpu() if isinstance(reps, torch.Tensor) else reps, dtype=np.float64)
    reps = reps.reshape(len(reps), -1)
    digits = np.arange(len(reps)) if digits is None else np.asarray(digits, dtype=np.int64)
    if len(digits) != len(reps) or digits.min() < 0 or digits.max() > 9:
        raise ArithInterpError(f"fourier_fit needs one digit 0..9 per row ({len(reps)} rows, {len(digits)} digits).")
    if np.allclose(reps, reps.mean(0)):
        raise ArithInterpError("the representations are identical for every digit; there is nothing to fit.")
    B, F = fourier_basis(frequencies), full_basis()
    rows, dims, r2 = _fit_r2(reps, B[digits])
    rows_f, dims_f, r2_f = _fit_r2(reps, F[digits])
    # spectrum from the digit means (centred), projected on the orthogonal full basis
    present = np.unique(digits)
    means = np.stack([reps[digits == d].mean(0) for d in present])
    means -= means.mean(0)
    Fp = F[present]
    coef, *_ = np.linalg.lstsq(Fp, means, rcond=None)
    power = (coef**2) * (Fp**2).sum(0)[:, None]
    groups = [[1, 2], [3, 4], [5, 6], [7, 8], [9]]  # columns of k = 1..5
    spectrum = np.array([power[g].sum() for g in groups])
    spectrum = spectrum / spectrum.sum() if spectrum.sum() > 0 else spectrum
    rng = np.random.default_rng(seed)
    control = []
    for _ in range(n_control):
        R = np.concatenate([np.ones((10, 1)), rng.standard_normal((10, B.shape[1] - 1))], axis=1)
        control.append(np.nanmedian(_fit_r2(reps, R[digits])[0]))
    return FourierFit(r2_rows=rows, r2_rows_full=rows_f, r2_dims=dims, r2_dims_full=dims_f, r2=r2, r2_full=r2_f,
                      median_r2=float(np.nanmedian(rows)), median_r2_full=float(np.nanmedian(rows_f)),
                      median_r2_dims=float(np.nanmedian(dims)), spectrum=spectrum,
                      control_r2=float(np.mean(control)))  # fmt: skip


def digit_means(X: Float[np.ndarray, "example d"], digits: Int[np.ndarray, " example"]) -> Float[np.ndarray, "digit d"]:
    """The mean representation of each digit 0..9 (every digit must occur)."""
    X, digits = np.asarray(X, dtype=np.float64).reshape(len(X), -1), np.asarray(digits)
    missing = sorted(set(range(10)) - set(digits.tolist()))
    if missing:
        raise ArithInterpError(f"digits {missing} never occur in these examples; use more examples.")
    return np.stack([X[digits == d].mean(0) for d in range(10)])


def digit_token_ids(tokenizer) -> list[int]:
    """The token id of each digit "0".."9" (each must be one token)."""
    ids = []
    for d in range(10):
        t = tokenizer.encode(str(d), add_special_tokens=False)
        if len(t) != 1:
            raise ArithInterpError(f"digit {d} is {len(t)} tokens under this tokenizer; digit embeddings need "
                                   "one token per digit.")  # fmt: skip
        ids.append(t[0])
    return ids


def digit_embeddings(model) -> Float[torch.Tensor, "digit d_model"]:
    """The embedding rows of the digit tokens "0".."9" of a bridge (or Hugging Face) model."""
    hf = getattr(model, "original_model", model)
    W_E = hf.get_input_embeddings().weight.detach().float()
    return W_E[digit_token_ids(model.tokenizer)]


# ---------------------------------------------------------------------------------------------------------
# PCA


def pca(X: Float[np.ndarray, "row d"], k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` principal-component coordinates of the rows of `X` and the variance share of each."""
    from sklearn.decomposition import PCA

    X = np.asarray(X.detach().float() if isinstance(X, torch.Tensor) else X, dtype=np.float64).reshape(len(X), -1)
    k = min(k, *X.shape)
    model = PCA(n_components=k, random_state=0).fit(X)
    return model.transform(X), model.explained_variance_ratio_


# ---------------------------------------------------------------------------------------------------------
# The `arithinterp probe` report


@dataclass(kw_only=True)
class ProbeReport:
    """Everything `arithinterp probe` writes: the probe grid, Fourier fits and PCA views."""

    result: ProbeResult
    threshold: float
    fourier: dict[str, FourierFit]  # "embedding" and, for digit targets, one per hook (digit means)
    pca_examples: tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]  # coords, values, explained, where
    pca_digits: tuple[np.ndarray, np.ndarray] | None  # digit-embedding coords, explained

    def first_decodable(self) -> dict[int, str | None]:
        """For each position: the first hook whose held-out score reaches `threshold` (None: never)."""
        return {pos: self.result.first_hook(self.threshold, pos) for pos in self.result.positions}

    def record(self) -> dict[str, Any]:
        r = self.result
        return {
            "target": r.target, "kind": r.kind, "score_metric": r.metric, "chance": r.chance,
            "probe": {"estimator": estimator_name(r.kind, r.config),
                      "standardised": True, "folds": r.config.folds, "split": "by example",
                      "regularization": r.config.regularization, "control": list(r.config.controls),
                      "n_examples_probed": r.n_examples, "seed": r.config.seed},
            "hooks": r.hooks, "positions": r.positions, "position_labels": r.position_labels,
            "classes": r.classes, "threshold": self.threshold,
            "first_decodable": {str(p): h for p, h in self.first_decodable().items()},
            "best": r.best(), "scores": r.records(),
            "fourier": {name: fit.record() for name, fit in self.fourier.items()},
            "pca": {"where": self.pca_examples[3], "explained_variance": self.pca_examples[2].tolist()},
        }  # fmt: skip


def estimator_name(kind: str, config: ProbeConfig) -> str:
    if kind == "regression":
        return "ridge regression"
    return "logistic regression" if config.estimator == "logistic" else "ridge classifier"


def probe_report(
    store, target: str, *, model=None, hooks: Sequence[str] | None = None, positions: Sequence[int] | None = None,
    config: ProbeConfig | None = None, threshold: float = 0.95, progress: bool = True,
) -> ProbeReport:  # fmt: skip
    """Probe `target` over a store, fit the Fourier digit basis and compute PCA views.

    Fourier fits: the digit tokens' embeddings of `model` (when given and its digits are single tokens) and,
    when the target is a digit 0..9, the per-digit mean activation of each hook at the position where the
    target reads best. PCA: the activations at the best hook and position, coloured by the target.
    """
    config = config or ProbeConfig()
    result, read = _probe_store(store, target, hooks=hooks, positions=positions, config=config, progress=progress)
    best = result.best()
    fourier: dict[str, FourierFit] = {}
    pca_digits = None
    if model is not None:
        try:
            emb = digit_embeddings(model)
        except ArithInterpError:
            emb = None
        if emb is not None:
            fourier["embedding"] = fourier_fit(emb)
            pca_digits = pca(emb)
    p = result.positions.index(best["position"])
    for h, hook in enumerate(result.hooks):  # digit targets only; None: the same features for every example
        if (means := read.digit_means.get((h, p))) is not None:
            fourier[f"{hook_label(hook)}@{best['position']}"] = fourier_fit(means)
    coords, explained = pca(read.best)
    return ProbeReport(result=result, threshold=threshold, fourier=fourier,
                       pca_examples=(coords, read.y, explained, {"hook": best["hook"], "position": best["position"]}),
                       pca_digits=pca_digits)  # fmt: skip


def report_figures(report: ProbeReport, *, title: str) -> list:
    """The figures of probe.html: score vs layer (with controls), the grid, Fourier fits, PCA views."""
    from arithinterp import plots

    r = report.result
    figs = [plots.probe_layer_figure(r, title=f"{title}: held-out score vs layer (dashed: control)"),
            plots.probe_heatmap(r, title=f"{title}: score per hook and position")]  # fmt: skip
    if report.fourier:
        figs.append(plots.digit_fourier_figure(report.fourier, title="Fourier digit basis: spectrum and R²"))
    coords, values, explained, where = report.pca_examples
    where_text = f"{where['hook']} at position {where['position']}"
    figs.append(plots.pca_figure(coords, values, explained=explained,
                                 title=f"PCA of {where_text}, coloured by {r.target}"))  # fmt: skip
    if report.pca_digits is not None:
        c, ev = report.pca_digits
        figs.append(plots.pca_figure(c, list(range(10)), explained=ev, text=[str(d) for d in range(10)],
                                     title="PCA of the digit tokens' embeddings"))  # fmt: skip
    return figs
