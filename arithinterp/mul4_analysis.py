"""Reading the 4×4 multiplication models: the analyses of Bai et al. 2025 on `icot-mul4`, `sft-mul4`, `aux-mul4`.

Every analysis runs the model on the no-cot format with the whole answer teacher-forced
("<bos>a*b$=c0..c7", 20 tokens), so output digit c_k is predicted at position `EQ_POS + k` (11 + k) and one
forward pass serves all eight digits.

* `digit_swap_attribution`: replace one operand digit (a_0..a_3, b_0..b_3) by another digit and measure how much
  the logit of each output digit c_k changes (mean |Δ logit|): an 8 × 8 map of which inputs each output reads.
  Multiplication makes c_k depend on every a_i, b_j with i, j <= k (through the carries), so a model that
  multiplies shows a filled lower triangle; one that has only learnt the first and last digits does not.
* `running_sum_probes`: a linear (ridge) regression from the residual stream of the last layer after attention
  (`blocks.1.hook_resid_mid`) at position EQ_POS + k to the running sum ĉ_k, held-out mean absolute error per k,
  and how often the rounded prediction gives the digit (round(ĉ_k) mod 10 = c_k). Bai et al. found ĉ_k decodable
  from the ICoT model (MAE ≈ 2 at ĉ_2) and not from the plain one (≈ 94). `run_all` also probes the input of the
  last MLP, after its LayerNorm (`blocks.1.mlp.hook_in`), and reports how much that LayerNorm's scale varies
  across problems (`ln_scale_cv`): a number written on one direction is divided by the scale there, so a scale
  that varies by a few percent blurs a ĉ_k of a few hundred by several units, too much to read c_k off it.
* `digit_field_probes`: the same probe for ĉ_k, s_k, the carries or c_k at every residual hook (where in depth
  the model holds them); `arithinterp probe --task mul4 --target running-sum`.
* `partial_product_probes`: held-out R² of a_i·b_j from every residual stream (after each attention and each
  MLP) at every output position.
* `attention_graph`: the mean attention pattern of every head from each output position to every earlier
  token, and for each (head, c_k) the operand-digit pair (a_i, b_j) it attends to most: the "cache and retrieve"
  graph (layer-0 heads read operand pairs; later heads read the positions where products were cached).
* `fourier_digit_fits`: the digit embeddings and the per-digit mean final hidden state at an output position,
  fitted with the Fourier basis of periods 10, 5, 2 (`arithinterp.probes.fourier_fit`); median R² over
  dimensions.
* `final_state_pca`: the first three principal components of the final hidden state at an output position,
  labelled by the output digit (Bai et al. see a pentagonal prism: parity × a period-5 circle).

All functions take a `TransformerBridge` (from `arithinterp.models.load`); `run_all` runs them together and
`figures` draws them with plotly. The work is many small matrix products, where extra threads cost more than
they save on a shared CPU (several times the CPU time for the same wall time), so it runs on one thread.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp._errors import ArithInterpError
from arithinterp.mul4 import DIGITS, EQ_POS, N_OUT, VOCAB, encode, mul4_meta
from arithinterp.train import random_pairs

OPERAND_LABELS = [f"a{i}" for i in range(DIGITS)] + [f"b{j}" for j in range(DIGITS)]
OUTPUT_LABELS = [f"c{k}" for k in range(N_OUT)]
A_POS = list(range(1, 1 + DIGITS))  # token positions of a_0..a_3
B_POS = list(range(2 + DIGITS, 2 + 2 * DIGITS))  # token positions of b_0..b_3
OPERAND_POS = A_POS + B_POS


@dataclass(frozen=True, kw_only=True)
class Mul4AnalysisConfig:
    """Examples and settings shared by the analyses."""

    n: int = 1000  # problems (uniform 4-digit operands, not the training distribution's held-out set)
    seed: int = 1  # problem seed
    batch_size: int = 500  # forward pass batch
    folds: int = 5  # cross-validation folds of the probes (split by example)
    ridge: float = 1.0  # ridge penalty of the probes (on standardised features)
    pca_digit: int = 3  # output digit whose final hidden state is shown in 3-D PCA
    fourier_digit: int = 3  # output digit whose final hidden state is fitted with the Fourier basis

    def __post_init__(self) -> None:
        if self.n < 2 * self.folds:
            raise ArithInterpError(f"n={self.n} is too few examples for {self.folds}-fold probes; pass n >= "
                                   f"{2 * self.folds} (e.g. --n 1000).")  # fmt: skip
        if self.folds < 2 or self.batch_size < 1 or self.ridge <= 0:
            raise ArithInterpError("folds must be >= 2, batch_size >= 1 and ridge > 0.")
        for name in ("pca_digit", "fourier_digit"):
            if not 0 <= getattr(self, name) < N_OUT:
                raise ArithInterpError(f"{name}={getattr(self, name)} must lie in 0..{N_OUT - 1}.")


@contextlib.contextmanager
def one_thread():
    """Run torch and BLAS on one thread inside the block (restored afterwards)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


def problems(n: int, seed: int) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
    """`n` random operand pairs, uniform in 0..9999 (seeded)."""
    return random_pairs(n, seed, DIGITS)


def sequences(a: Int[Tensor, " n"], b: Int[Tensor, " n"]) -> Int[Tensor, "n pos"]:
    """The model input "<bos>a*b$=c0..c7" (no <eos>): the model input with the whole answer teacher-forced."""
    return encode(a, b)[:, :-1]


def check_vocabulary(model) -> None:
    """Refuse a model whose tokenizer does not give the multiplication tokens the ids `mul4.encode` writes (the
    character vocabulary of the built-in models): its analyses would read garbage. Models without a tokenizer
    (hand-built test models) pass."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return
    theirs = tokenizer.get_vocab()
    wrong = [t for i, t in enumerate(VOCAB) if theirs.get(t) != i]
    if wrong:
        name, token = getattr(model, "arithinterp_spec", "this model"), wrong[0]
        there = f"has id {theirs[token]} there" if token in theirs else "is not in its vocabulary"
        raise ArithInterpError(f"{name!r} does not use the multiplication vocabulary (token {token!r} {there}, id "
                               f"{VOCAB.index(token)} in mul4.VOCAB); the 4x4 "
                               "analyses run on models trained with `arithinterp train --task mul4-icot` (or "
                               "mul4-sft, mul4-aux) and the other built-ins, which share it.")  # fmt: skip


def _logits(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
    check_vocabulary(model)
    out = model(tokens)
    return out if isinstance(out, Tensor) else out.logits


@torch.no_grad()
def _run(model, tokens: Tensor, names: Sequence[str], batch_size: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and the named activations for all `tokens`, batched."""
    check_vocabulary(model)
    keep = set(names)
    logits, acts = [], {n: [] for n in names}
    for i in range(0, len(tokens), batch_size):
        lg, cache = model.run_with_cache(tokens[i : i + batch_size], names_filter=lambda n: n in keep)
        logits.append(lg.float())
        for n in names:
            acts[n].append(cache[n].float())
    return torch.cat(logits), {n: torch.cat(v) for n, v in acts.items()}


# ---------------------------------------------------------------------------------------------------------
# Accuracy


@torch.no_grad()
def accuracy(model, a: Tensor, b: Tensor, batch_size: int = 500, *, logits: Tensor | None = None) -> dict[str, Any]:
    """Teacher-forced argmax accuracy per output digit and exact match (= greedy exact match).

    `logits`: the model's logits on `sequences(a, b)` when already computed (by `_run`); otherwise computed here.
    """
    seq = encode(a, b)
    out = _output_logits(model, seq[:, :-1], batch_size, logits)
    hit = out.argmax(-1) == seq[:, EQ_POS + 1 : EQ_POS + 1 + N_OUT]
    return {"exact_match": hit.all(1).float().mean().item(), "digit_accuracy": hit.float().mean().item(),
            "digit_accuracy_per_k": [round(v, 4) for v in hit.float().mean(0).tolist()]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Digit-swap logit attribution


@torch.no_grad()
def digit_swap_attribution(model, a: Tensor, b: Tensor, *, seed: int = 0, batch_size: int = 500,
                           logits: Tensor | None = None) -> Float[np.ndarray, "operand digit"]:  # fmt: skip
    """Mean |Δ logit| of each output digit's correct token when one operand digit is replaced.

    Row r (a_0..a_3, b_0..b_3) replaces that digit of every problem by a different digit drawn at random; column
    k is the change of the logit of the original c_k at position EQ_POS + k (the prompt and the earlier answer
    digits stay those of the original problem, so only the operand digit differs). `logits`: the model's logits
    on `sequences(a, b)` when already computed (by `_run`).
    """
    g = torch.Generator().manual_seed(seed)
    seq = sequences(a, b)
    target = encode(a, b)[:, EQ_POS + 1 : EQ_POS + 1 + N_OUT]  # (n, digit)
    d0 = int(seq[0, A_POS[0]] - (a[0] % 10))  # token id of "0"
    base = _pick(model, seq, target, batch_size, logits)
    out = np.zeros((len(OPERAND_POS), N_OUT))
    for r, pos in enumerate(OPERAND_POS):
        swapped = seq.clone()
        old = swapped[:, pos] - d0
        new = (old + torch.randint(1, 10, old.shape, generator=g)) % 10  # always a different digit
        swapped[:, pos] = new + d0
        out[r] = (_pick(model, swapped, target, batch_size) - base).abs().mean(0).numpy()
    return out


def _output_logits(model, seq: Tensor, batch_size: int, logits: Tensor | None = None) -> Tensor:
    """Logits (float) at the positions predicting c_0..c_7: sliced from `logits` of `seq` when given, else run."""
    if logits is None:
        logits = torch.cat([_logits(model, seq[i : i + batch_size])[:, EQ_POS : EQ_POS + N_OUT]
                            for i in range(0, len(seq), batch_size)])  # fmt: skip
        return logits.float()
    return logits[:, EQ_POS : EQ_POS + N_OUT].float()


def _pick(model, seq: Tensor, target: Tensor, batch_size: int, logits: Tensor | None = None) -> Tensor:
    """The logit of each `target` digit at the position predicting it."""
    return _output_logits(model, seq, batch_size, logits).gather(-1, target[:, :, None])[..., 0]


# ---------------------------------------------------------------------------------------------------------
# Probes (closed-form ridge, cross-validated over examples; many targets per fit)


def ridge_cv(X: Float[np.ndarray, "example feature"], Y: Float[np.ndarray, "example target"], *, folds: int = 5,
             alpha: float = 1.0, seed: int = 0) -> Float[np.ndarray, "example target"]:  # fmt: skip
    """Held-out predictions of a ridge regression of every column of `Y` on `X` (K folds over examples).

    Features are standardised with the training fold's mean and standard deviation; `alpha` is the penalty on
    the standardised weights. Closed form, so probing many targets costs one solve per fold.
    """
    from threadpoolctl import threadpool_limits

    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    Y = np.asarray(Y, dtype=np.float64).reshape(len(Y), -1)
    with threadpool_limits(1):
        return _ridge_cv(X, Y, folds, alpha, seed)


def _ridge_cv(X: np.ndarray, Y: np.ndarray, folds: int, alpha: float, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(X))
    pred = np.zeros_like(Y)
    for test in np.array_split(order, folds):
        train = np.setdiff1d(order, test)
        mu, sd = X[train].mean(0), X[train].std(0) + 1e-8
        Xt = (X[train] - mu) / sd
        ym = Y[train].mean(0)
        w = np.linalg.solve(Xt.T @ Xt + alpha * np.eye(X.shape[1]), Xt.T @ (Y[train] - ym))
        pred[test] = ((X[test] - mu) / sd) @ w + ym
    return pred


def _r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    ss = ((y - y.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ss > 0, 1 - ((y - pred) ** 2).sum(0) / ss, np.nan)


def metadata(a: Tensor, b: Tensor) -> list[dict[str, Any]]:
    """`mul4_meta` of every problem."""
    return [mul4_meta(int(x), int(y)) for x, y in zip(a.tolist(), b.tolist())]


@dataclass(kw_only=True)
class RunningSumProbe:
    """Held-out MAE and R² of ĉ_k per output digit k, with a shuffled-label control MAE."""

    hook: str
    mae: list[float]
    r2: list[float]
    control_mae: list[float]
    mean_abs_target: list[float]  # mean |ĉ_k - mean ĉ_k|: the MAE of always guessing the mean
    readout_accuracy: list[float]  # share of problems whose rounded held-out prediction gives c_k = ĉ_k mod 10


def running_sum_probes(model, a: Tensor, b: Tensor, *, hook: str | None = None, folds: int = 5, alpha: float = 1.0,
                       batch_size: int = 500, acts: dict[str, Tensor] | None = None) -> RunningSumProbe:  # fmt: skip
    """Linear probes for ĉ_k from `hook` (default: the last layer's residual after attention) at EQ_POS + k.

    Besides the error, `readout_accuracy[k]` is the share of problems for which the held-out prediction, rounded
    to an integer, gives the output digit (round(pred) mod 10 = c_k): what a model that wrote ĉ_k on one direction
    at `hook` could get from it by reading the number and taking it mod 10.
    """
    hook = hook or f"blocks.{model.cfg.n_layers - 1}.hook_resid_mid"
    if acts is None or hook not in acts:
        _, acts = _run(model, sequences(a, b), [hook], batch_size)
    Y = _field_values(a, b, "running_sums")
    fit = _probe_per_digit(acts[hook][:, EQ_POS : EQ_POS + N_OUT].numpy(), Y, folds, alpha)
    readout = (np.mod(np.rint(fit["pred"]), 10) == np.mod(Y, 10)).mean(0)
    return RunningSumProbe(hook=hook, mae=fit["mae"], r2=fit["r2"], control_mae=fit["control_mae"],
                           mean_abs_target=fit["mean_abs_target"], readout_accuracy=readout.tolist())  # fmt: skip


def _field_values(a: Tensor, b: Tensor, name: str) -> Float[np.ndarray, "n digit"]:
    return np.array([m[name] for m in metadata(a, b)], dtype=np.float64)


def _probe_per_digit(X: Float[np.ndarray, "n digit d"], Y: Float[np.ndarray, "n digit"], folds: int,
                     alpha: float) -> dict[str, Any]:  # fmt: skip
    """Ridge probe of Y[:, k] from X[:, k] for every k (held-out predictions by `ridge_cv`), with a shuffled-label
    control refitted the same way. The control's permutations come from a fixed seed (0)."""
    rng = np.random.default_rng(0)
    pred = np.zeros_like(Y)
    mae, r2, ctrl, spread = [], [], [], []
    for k in range(Y.shape[1]):
        y = Y[:, k : k + 1]
        pred[:, k : k + 1] = ridge_cv(X[:, k], y, folds=folds, alpha=alpha)
        mae.append(float(np.abs(pred[:, k] - Y[:, k]).mean()))
        r2.append(float(_r2(y, pred[:, k : k + 1])[0]))
        shuffled = rng.permutation(y)
        ctrl.append(float(np.abs(ridge_cv(X[:, k], shuffled, folds=folds, alpha=alpha) - shuffled).mean()))
        spread.append(float(np.abs(y - y.mean()).mean()))
    return {"pred": pred, "mae": mae, "r2": r2, "control_mae": ctrl, "mean_abs_target": spread}


#: Metadata fields with one value per output digit, probed at the position predicting that digit
#: (`digit_field_probes`; `arithinterp probe --task mul4 --target running-sum`).
DIGIT_FIELDS = {"running_sums": "ĉ_k = s_k + carry", "column_sums": "s_k = Σ_{i+j=k} a_i·b_j",
                "carries": "the carry into place k", "result_digits": "the output digit c_k",
                "unit_sums": "U_k = Σ_{i+j=k} (a_i·b_j mod 10) + carry"}  # fmt: skip
_FIELD_ALIASES = {"running_sum": "running_sums", "column_sum": "column_sums", "carry": "carries",
                  "result_digit": "result_digits", "output_digits": "result_digits",
                  "unit_sum": "unit_sums"}  # fmt: skip


def digit_field(name: str) -> str | None:
    """The `DIGIT_FIELDS` key that `name` means ("running-sum", "running_sums", "carry", ...), or None."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _FIELD_ALIASES.get(key, key)
    return key if key in DIGIT_FIELDS else None


@dataclass(kw_only=True)
class DigitFieldProbe:
    """Held-out ridge probes of one per-digit field, value k read at the position predicting c_k, per hook.

    Arrays are (hook, k). `rounded_exact`: share of problems whose rounded prediction is the value itself.
    """

    field: str
    hooks: list[str]
    n: int
    mae: np.ndarray
    r2: np.ndarray
    control_mae: np.ndarray
    rounded_exact: np.ndarray
    mean_abs_deviation: list[float]  # per k: the MAE of always guessing the mean

    def record(self) -> dict[str, Any]:
        return {"field": self.field, "meaning": DIGIT_FIELDS[self.field], "n": self.n, "hooks": self.hooks,
                "positions": [EQ_POS + k for k in range(N_OUT)], "columns": OUTPUT_LABELS,
                "mae": self.mae.round(4).tolist(), "r2": self.r2.round(4).tolist(),
                "control_mae": self.control_mae.round(4).tolist(),
                "rounded_exact": self.rounded_exact.round(4).tolist(),
                "mean_abs_deviation": [round(v, 4) for v in self.mean_abs_deviation]}  # fmt: skip


def digit_field_probes(model, a: Tensor, b: Tensor, field: str = "running_sums", *,
                       hooks: Sequence[str] | None = None, folds: int = 5, alpha: float = 1.0,
                       batch_size: int = 500, acts: dict[str, Tensor] | None = None) -> DigitFieldProbe:  # fmt: skip
    """Probe `field` (a `DIGIT_FIELDS` key: its value k at position EQ_POS + k) at every hook of `hooks`
    (default: the embeddings, then the residual stream after every attention and every MLP): where in depth the
    model holds the running sum (or column sum, carry, digit) of each place."""
    if field not in DIGIT_FIELDS:
        raise ArithInterpError(f"field {field!r} is not a per-digit field; choose one of: {', '.join(DIGIT_FIELDS)}.")
    if len(a) < 2 * folds:
        raise ArithInterpError(f"{len(a)} problems are too few for {folds}-fold probes; use at least {2 * folds}.")
    hooks = list(hooks) if hooks is not None else ["blocks.0.hook_resid_pre", *residual_hooks(model)]
    missing = [h for h in hooks if acts is None or h not in acts]
    if missing:
        _, fresh = _run(model, sequences(a, b), missing, batch_size)
        acts = {**(acts or {}), **fresh}
    Y = _field_values(a, b, field)
    fits = [_probe_per_digit(acts[h][:, EQ_POS : EQ_POS + N_OUT].numpy(), Y, folds, alpha) for h in hooks]
    exact = np.stack([(np.rint(f["pred"]) == Y).mean(0) for f in fits])
    return DigitFieldProbe(field=field, hooks=hooks, n=len(a), mae=np.array([f["mae"] for f in fits]),
                           r2=np.array([f["r2"] for f in fits]), control_mae=np.array([f["control_mae"] for f in fits]),
                           rounded_exact=exact, mean_abs_deviation=fits[0]["mean_abs_target"])  # fmt: skip


def digit_field_figure(probe: DigitFieldProbe, *, title: str = ""):
    """Two heatmaps, hook × output digit: the held-out R² and MAE of the probes."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["held-out R²", "held-out MAE (control on hover)"])
    fig.add_trace(go.Heatmap(z=probe.r2, x=OUTPUT_LABELS, y=probe.hooks, zmin=0, zmax=1, colorscale="Viridis",
                             colorbar={"title": "R²", "x": 0.45}, texttemplate="%{z:.2f}"), 1, 1)  # fmt: skip
    fig.add_trace(go.Heatmap(z=probe.mae, x=OUTPUT_LABELS, y=probe.hooks, colorscale="Magma_r",
                             customdata=probe.control_mae, colorbar={"title": "MAE"}, texttemplate="%{z:.1f}",
                             hovertemplate="%{y} %{x}: MAE %{z:.2f} (shuffled-label control %{customdata:.2f})"
                                           "<extra></extra>"), 1, 2)  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"{title + ': ' if title else ''}{probe.field} ({DIGIT_FIELDS[probe.field]}) at the "
                            f"position predicting c_k, linear probes on {probe.n} problems",
                      height=200 + 40 * len(probe.hooks))  # fmt: skip
    return fig


def mlp_input_hooks(model) -> tuple[str, str]:
    """The last MLP's input (its LayerNorm's output) and that LayerNorm's scale (one number per token)."""
    layer = model.cfg.n_layers - 1
    return f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.ln2.hook_scale"


def scale_variation(acts: dict[str, Tensor], hook: str) -> list[float]:
    """Coefficient of variation (std / mean over problems) of a LayerNorm scale at each position EQ_POS + k."""
    scale = acts[hook][:, EQ_POS : EQ_POS + N_OUT].reshape(len(acts[hook]), N_OUT).double()
    return [round(v, 4) for v in (scale.std(0) / scale.mean(0)).tolist()]


def residual_hooks(model) -> list[str]:
    """The residual stream after every attention and every MLP, in model order."""
    out = []
    for layer in range(model.cfg.n_layers):
        out += [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_resid_post"]
    return out


@dataclass(kw_only=True)
class PartialProductProbe:
    """`r2[hook, pos, i, j]`: held-out R² of a_i·b_j from `hooks[hook]` at token position `positions[pos]`."""

    hooks: list[str]
    positions: list[int]
    r2: np.ndarray
    control_r2: float  # the largest R² of the same probes on shuffled labels (chance: <= 0)


def partial_product_probes(model, a: Tensor, b: Tensor, *, hooks: Sequence[str] | None = None,
                           positions: Sequence[int] | None = None, folds: int = 5, alpha: float = 1.0,
                           batch_size: int = 500, acts: dict[str, Tensor] | None = None,
                           progress: bool = False) -> PartialProductProbe:  # fmt: skip
    """Probes for all 16 partial products a_i·b_j at every hook and position (default: every residual stream
    after attention and MLP, at the "$" token and at the positions predicting c_0..c_7)."""
    hooks = list(hooks or residual_hooks(model))
    positions = list(positions if positions is not None else range(EQ_POS - 1, EQ_POS + N_OUT))
    if acts is None or any(h not in acts for h in hooks):
        _, acts = _run(model, sequences(a, b), hooks, batch_size)
    Y = np.array([np.ravel(m["partial_products"]) for m in metadata(a, b)], dtype=np.float64)  # (n, 16)
    r2 = np.zeros((len(hooks), len(positions), DIGITS, DIGITS))
    rng = np.random.default_rng(0)
    Ys = Y[rng.permutation(len(Y))]
    control = -np.inf
    with tqdm(total=len(hooks) * len(positions), desc="partial products", disable=not progress) as bar:
        for h, hook in enumerate(hooks):
            for p, pos in enumerate(positions):
                X = acts[hook][:, pos].numpy()
                r2[h, p] = _r2(Y, ridge_cv(X, Y, folds=folds, alpha=alpha)).reshape(DIGITS, DIGITS)
                control = max(control, float(np.nanmax(_r2(Ys, ridge_cv(X, Ys, folds=folds, alpha=alpha)))))
                bar.update(1)
    return PartialProductProbe(hooks=hooks, positions=positions, r2=r2, control_r2=control)


# ---------------------------------------------------------------------------------------------------------
# Attention: cache and retrieve


@dataclass(kw_only=True)
class AttentionGraph:
    """Mean attention from each output position to every token, per layer and head.

    `pattern[layer, head, k, key]`: mean attention weight from position EQ_POS + k (predicting c_k) to token
    position `key` (0..EQ_POS + k). `pairs[layer][head][k]`: the a-digit and the b-digit this head attends to most
    from that position, with their weights: the operand-digit pair (a_i, b_j) it reads.
    """

    pattern: np.ndarray
    token_labels: list[str]
    pairs: list[list[list[dict[str, Any]]]]

    def edges(self, threshold: float = 0.1) -> list[dict[str, Any]]:
        """(layer, head, c_k) → token edges with mean attention >= threshold, strongest first."""
        out = []
        L, H, K, _ = self.pattern.shape
        for layer in range(L):
            for head in range(H):
                for k in range(K):
                    for key in np.flatnonzero(self.pattern[layer, head, k] >= threshold):
                        weight = float(self.pattern[layer, head, k, key])
                        out.append({"layer": layer, "head": head, "output": f"c{k}", "key": int(key),
                                    "token": self.token_labels[key], "weight": weight})  # fmt: skip
        return sorted(out, key=lambda e: -e["weight"])


def token_labels() -> list[str]:
    """Names of the 20 input positions: <bos>, a0..a3, *, b0..b3, $, =, c0..c6 (c7 is never an input)."""
    return ["<bos>", *OPERAND_LABELS[:DIGITS], "*", *OPERAND_LABELS[DIGITS:], "$", "="] + OUTPUT_LABELS[:-1]


def attention_graph(model, a: Tensor, b: Tensor, *, batch_size: int = 500,
                    acts: dict[str, Tensor] | None = None) -> AttentionGraph:  # fmt: skip
    """Mean attention patterns from the output positions, and the operand pair each head reads per c_k."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    if acts is None or any(n not in acts for n in names):
        _, acts = _run(model, sequences(a, b), names, batch_size)
    pattern = np.stack([acts[n][:, :, EQ_POS : EQ_POS + N_OUT].mean(0).numpy() for n in names])  # (L, H, k, key)
    pairs = []
    for layer in range(pattern.shape[0]):
        pairs.append([])
        for head in range(pattern.shape[1]):
            row = []
            for k in range(N_OUT):
                wa = pattern[layer, head, k, A_POS]
                wb = pattern[layer, head, k, B_POS]
                i, j = int(wa.argmax()), int(wb.argmax())
                row.append({"a": i, "b": j, "weight_a": float(wa[i]), "weight_b": float(wb[j]),
                            "operand_share": float(wa.sum() + wb.sum())})  # fmt: skip
            pairs[-1].append(row)
    return AttentionGraph(pattern=pattern, token_labels=token_labels(), pairs=pairs)


# ---------------------------------------------------------------------------------------------------------
# Fourier digit representations and PCA


def final_state(acts: dict[str, Tensor], model) -> Tensor:
    """The final hidden state (after the last block and the final layer norm), all positions."""
    return acts["ln_final.hook_normalized"]


def fourier_digit_fits(model, a: Tensor, b: Tensor, *, digit: int = 3, batch_size: int = 500,
                       acts: dict[str, Tensor] | None = None) -> dict[str, Any]:  # fmt: skip
    """Fourier-basis (periods 10, 5, 2) fits of the digit embeddings and of the per-digit mean final hidden state
    at the position predicting c_`digit`; the headline is the median R² over dimensions (each hidden dimension
    as a function of the digit), with the random-basis control of `arithinterp.probes.fourier_fit`."""
    from arithinterp.probes import digit_embeddings, digit_means, fourier_fit

    if acts is None or "ln_final.hook_normalized" not in acts:
        _, acts = _run(model, sequences(a, b), ["ln_final.hook_normalized"], batch_size)
    c = np.array([m["result_digits"][digit] for m in metadata(a, b)])
    X = final_state(acts, model)[:, EQ_POS + digit].numpy()
    out = {}
    for name, reps in (("embedding", digit_embeddings(model).numpy()), (f"final_state_c{digit}", digit_means(X, c))):
        fit = fourier_fit(reps)
        out[name] = {"median_r2_dims": fit.median_r2_dims, "median_r2_rows": fit.median_r2, "r2": fit.r2,
                     "control_r2": fit.control_r2, "spectrum": fit.record()["spectrum"],
                     "r2_dims": fit.r2_dims.tolist()}  # fmt: skip
    return out


def final_state_pca(model, a: Tensor, b: Tensor, *, digit: int = 3, batch_size: int = 500,
                    acts: dict[str, Tensor] | None = None) -> dict[str, Any]:  # fmt: skip
    """3-D PCA coordinates of the final hidden state at the position predicting c_`digit`, with c_`digit`."""
    from arithinterp.probes import pca

    if acts is None or "ln_final.hook_normalized" not in acts:
        _, acts = _run(model, sequences(a, b), ["ln_final.hook_normalized"], batch_size)
    X = final_state(acts, model)[:, EQ_POS + digit].numpy()
    coords, var = pca(X, 3)
    c = [m["result_digits"][digit] for m in metadata(a, b)]
    return {"digit": digit, "coords": coords, "explained_variance": [float(v) for v in var], "labels": c}


# ---------------------------------------------------------------------------------------------------------
# Everything together


@dataclass(kw_only=True)
class Mul4Report:
    """All analyses of one model (see the module docstring); `record()` is the JSON of `arithinterp mul4-analyze`."""

    accuracy: dict[str, Any]
    digit_swap: np.ndarray
    running_sums: RunningSumProbe
    running_sums_mlp_in: RunningSumProbe  # the same probes at the last MLP's input, after its LayerNorm
    ln_scale_cv: list[float]  # variation of that LayerNorm's scale across problems, per k
    partial_products: PartialProductProbe
    attention: AttentionGraph
    fourier: dict[str, Any]
    pca: dict[str, Any]
    config: Mul4AnalysisConfig
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        pp = self.partial_products
        best = pp.r2.max(axis=(0, 1))  # best R² per (i, j) over hooks and positions
        return {
            "accuracy": self.accuracy,
            "digit_swap": {"rows": OPERAND_LABELS, "columns": OUTPUT_LABELS, "mean_abs_logit_change":
                           self.digit_swap.round(4).tolist()},
            "running_sum_probe": _probe_record(self.running_sums),
            "running_sum_probe_mlp_in": _probe_record(self.running_sums_mlp_in) | {
                "ln_scale_cv_per_k": self.ln_scale_cv},
            "partial_product_probe": {"hooks": pp.hooks, "positions": pp.positions,
                                      "best_r2": best.round(4).tolist(), "control_r2": pp.control_r2,
                                      "r2": pp.r2.round(4).tolist()},
            "attention": {"token_labels": self.attention.token_labels, "pairs": self.attention.pairs,
                          "edges": self.attention.edges(0.2)[:64]},
            "fourier": {k: {kk: vv for kk, vv in v.items() if kk != "r2_dims"} for k, v in self.fourier.items()},
            "pca": {"digit": self.pca["digit"], "explained_variance": self.pca["explained_variance"]},
            "config": self.config.__dict__,
        }  # fmt: skip


def _probe_record(p: RunningSumProbe) -> dict[str, Any]:
    return {"hook": p.hook, "mae_per_k": p.mae, "r2_per_k": p.r2, "control_mae_per_k": p.control_mae,
            "mean_abs_deviation_per_k": p.mean_abs_target, "readout_accuracy_per_k": p.readout_accuracy}  # fmt: skip


def run_all(model, config: Mul4AnalysisConfig | None = None, *, progress: bool = True) -> Mul4Report:
    """Every analysis of the module on `config.n` problems, from one cached forward pass."""
    config = config or Mul4AnalysisConfig()
    with one_thread():
        return _run_all(model, config, progress)


def _run_all(model, config: Mul4AnalysisConfig, progress: bool) -> Mul4Report:
    a, b = problems(config.n, config.seed)
    names = residual_hooks(model) + [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    mlp_in, ln_scale = mlp_input_hooks(model)
    names += ["ln_final.hook_normalized", mlp_in, ln_scale]
    logits, acts = _run(model, sequences(a, b), names, config.batch_size)
    common = {"batch_size": config.batch_size, "acts": acts}
    probe = {"folds": config.folds, "alpha": config.ridge}
    return Mul4Report(
        accuracy=accuracy(model, a, b, config.batch_size, logits=logits),
        digit_swap=digit_swap_attribution(model, a, b, seed=config.seed, batch_size=config.batch_size, logits=logits),
        running_sums=running_sum_probes(model, a, b, **probe, **common),
        running_sums_mlp_in=running_sum_probes(model, a, b, hook=mlp_in, **probe, **common),
        ln_scale_cv=scale_variation(acts, ln_scale),
        partial_products=partial_product_probes(model, a, b, **probe, **common, progress=progress),
        attention=attention_graph(model, a, b, **common),
        fourier=fourier_digit_fits(model, a, b, digit=config.fourier_digit, **common),
        pca=final_state_pca(model, a, b, digit=config.pca_digit, **common),
        config=config,
    )


# ---------------------------------------------------------------------------------------------------------
# Figures


def figures(report: Mul4Report, *, title: str = "") -> list:
    """Plotly figures: digit-swap heatmap, running-sum probes (`running_sum_figure`), partial-product R², attention,
    PCA."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = f"{title}: " if title else ""
    figs = []
    figs.append(go.Figure(go.Heatmap(z=report.digit_swap, x=OUTPUT_LABELS, y=OPERAND_LABELS, colorscale="Viridis",
                                     colorbar={"title": "|Δ logit|"}),
                          layout={"title": f"{t}digit-swap logit attribution", "xaxis_title": "output digit",
                                  "yaxis_title": "operand digit changed", "yaxis_autorange": "reversed"}))  # fmt: skip
    figs.append(running_sum_figure(report.running_sums, report.running_sums_mlp_in, title=title))
    pp = report.partial_products
    pairs = [f"a{i}b{j}" for i in range(DIGITS) for j in range(DIGITS)]
    labels = token_labels()
    fig = make_subplots(rows=1, cols=len(pp.hooks), subplot_titles=pp.hooks, shared_yaxes=True)
    for h in range(len(pp.hooks)):
        z = pp.r2[h].reshape(len(pp.positions), -1).T  # (pair, position)
        fig.add_trace(go.Heatmap(z=z, x=[labels[p] for p in pp.positions], y=pairs, zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=h == 0), 1, h + 1)  # fmt: skip
    fig.update_layout(title=f"{t}partial products a_i·b_j: held-out R² per layer and position (position = token "
                            "whose residual is read)")  # fmt: skip
    figs.append(fig)
    att = report.attention
    L, H = att.pattern.shape[:2]
    fig = make_subplots(rows=L, cols=H, subplot_titles=[f"L{i}H{j}" for i in range(L) for j in range(H)])
    for layer in range(L):
        for head in range(H):
            fig.add_trace(go.Heatmap(z=att.pattern[layer, head], x=att.token_labels, y=OUTPUT_LABELS, zmin=0, zmax=1,
                                     colorscale="Blues", showscale=False), layer + 1, head + 1)  # fmt: skip
    fig.update_layout(title=f"{t}mean attention from the position predicting c_k (rows) to each token (columns)",
                      height=320 * L)  # fmt: skip
    figs.append(fig)
    p = report.pca
    xyz = np.asarray(p["coords"])
    var = ", ".join(f"{v:.2f}" for v in p["explained_variance"])
    pca_title = f"{t}final hidden state predicting c{p['digit']}: 3-D PCA (variance {var})"
    figs.append(go.Figure(go.Scatter3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers",
                                       marker={"size": 3, "color": p["labels"], "colorscale": "Turbo",
                                               "colorbar": {"title": f"c{p['digit']}"}},
                                       text=[str(v) for v in p["labels"]]),
                          layout={"title": pca_title}))  # fmt: skip
    return figs


def running_sum_figure(after_attention: RunningSumProbe, mlp_input: RunningSumProbe, *, title: str = ""):
    """Two panels: the held-out MAE of the ĉ_k probes at both sites (with the shuffled-label control of the
    first), and the share of problems whose rounded prediction gives c_k."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["held-out MAE of ĉ_k", "round(prediction) mod 10 = c_k"])
    for p, where, color in ((after_attention, "after attention", "#1f77b4"),
                            (mlp_input, "MLP input, after its LayerNorm", "#ff7f0e")):  # fmt: skip
        name = f"{p.hook} ({where})"
        fig.add_trace(go.Bar(x=OUTPUT_LABELS, y=p.mae, name=name, marker_color=color, legendgroup=name), 1, 1)
        fig.add_trace(go.Bar(x=OUTPUT_LABELS, y=p.readout_accuracy, name=name, marker_color=color, legendgroup=name,
                             showlegend=False), 1, 2)  # fmt: skip
    fig.add_trace(go.Bar(x=OUTPUT_LABELS, y=after_attention.control_mae, name="shuffled-label control",
                         marker_color="#aaaaaa"), 1, 1)  # fmt: skip
    fig.update_layout(title=f"{title + ': ' if title else ''}running sum ĉ_k, linear probes in the last layer",
                      barmode="group", legend={"orientation": "h", "y": -0.2})  # fmt: skip
    fig.update_yaxes(title_text="mean absolute error", row=1, col=1)
    fig.update_yaxes(title_text="share of problems", range=[0, 1], row=1, col=2)
    return fig
