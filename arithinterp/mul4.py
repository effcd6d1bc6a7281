"""4×4-digit multiplication with and without chain of thought, and the three built-in models trained on it.

After Bai et al. 2025 ("Why can't transformers learn multiplication?") and Deng et al. 2024 (stepwise
internalization, "implicit chain of thought"). Every number is written least significant digit first, so that the
k-th output digit c_k is emitted after the digits it depends on. A problem a × b with digits a_i, b_j (index i =
the 10**i place) has

* partial products a_i·b_j,
* column sums s_k = Σ_{i+j=k} a_i·b_j (k = 0..7; s_7 = 0),
* running sums ĉ_k = s_k + r_{k-1}, where r_k = ĉ_k // 10 is the carry out of place k (r_{-1} = 0),
* output digits c_k = ĉ_k mod 10.

Token formats (one token per character, `arithinterp.tokenizer`)::

    no-cot   <bos> a0a1a2a3 * b0b1b2b3 $ = c0..c7 <eos>
    cot      <bos> a0a1a2a3 * b0b1b2b3 $ COT = c0..c7 <eos>
    COT  =   P0 + P1 : S1 + P2 : S2 + P3          (44 tokens)

where P_j = a·b_j·10**j (5 + j digits, LSB first, so it starts with j zeros) and S_j = Σ_{j'<=j} P_j' are the
running partial sums, as in Deng et al. (who write "(S_j)" where we write ": S_j"; the vocabulary has no
brackets). Stage t of stepwise internalization removes the first `t · remove_per_stage` tokens of COT; the last
stage is the no-cot format, which all three models are evaluated and analysed in.

Training (`train_mul4`, dispatched by `arithinterp train --task mul4-*`):

* `mul4-icot`: stepwise internalization, the optimiser reset at the start of every stage;
* `mul4-sft`: the no-cot format from the start;
* `mul4-aux`: no-cot plus an auxiliary loss: a linear head per output digit reads the last layer's attention
  output at the position that predicts c_k and regresses ĉ_k (mean squared error on ĉ_k / 10).

Runs are resumable from an atomic checkpoint, like `arithinterp.train.train`.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp._errors import ArithInterpError
from arithinterp._io import atomic_write_bytes, atomic_write_json
from arithinterp.tokenizer import VOCAB
from arithinterp.train import _MUL4_DEFAULTS, random_pairs

DIGITS = 4  # operand length
N_OUT = 2 * DIGITS  # output digits c_0..c_7
PREFIX = 1 + DIGITS + 1 + DIGITS + 1  # <bos> a * b $  (the "=" follows at this index in the no-cot format)
EQ_POS = PREFIX  # position of "=" in the no-cot format; c_k is predicted at EQ_POS + k
COT_PARTS = (("P", 0, 5), ("+",), ("P", 1, 6), (":",), ("S", 1, 6), ("+",), ("P", 2, 7), (":",), ("S", 2, 7),
             ("+",), ("P", 3, 8))  # fmt: skip
COT_LEN = sum(p[2] if len(p) == 3 else 1 for p in COT_PARTS)  # 44
NO_COT_LEN = PREFIX + 1 + N_OUT + 1  # 21 tokens including <bos> and <eos>
TASKS = ("mul4-icot", "mul4-sft", "mul4-aux")
AUX_TARGETS = ("sum", "phase", "units")
#: The targets the heads regress as one number per digit (read back as round(x) mod 10), not as a phase.
SCALAR_AUX_TARGETS = ("sum", "units")

_STOI = {t: i for i, t in enumerate(VOCAB)}
_D0 = _STOI["0"]


# ---------------------------------------------------------------------------------------------------------
# Metadata, worked out in plain Python (the tests check it against values computed on paper)


def digits_lsb(x: int, width: int) -> list[int]:
    """Digits of `x`, least significant first, zero-padded to `width`."""
    return [(x // 10**i) % 10 for i in range(width)]


def mul4_meta(a: int, b: int) -> dict[str, Any]:
    """Everything a probe may ask about a × b, as plain JSON-able lists (index i = the 10**i place).

    `partial_products[i][j]` = a_i·b_j; `column_sums[k]` = s_k; `carries[k]` = r_{k-1}, the carry *into* place k;
    `running_sums[k]` = ĉ_k = s_k + carries[k]; `result_digits[k]` = c_k = ĉ_k mod 10; `unit_sums[k]` = U_k, the
    units digits of column k's partial products plus carries[k] (≡ ĉ_k mod 10, see `unit_sums`).
    """
    if not (0 <= a < 10**DIGITS and 0 <= b < 10**DIGITS):
        raise ArithInterpError(f"operands {a} and {b} must lie in 0..{10**DIGITS - 1} for 4x4 multiplication.")
    ad, bd = digits_lsb(a, DIGITS), digits_lsb(b, DIGITS)
    pp = [[ad[i] * bd[j] for j in range(DIGITS)] for i in range(DIGITS)]
    s = [sum(pp[i][k - i] for i in range(DIGITS) if 0 <= k - i < DIGITS) for k in range(N_OUT)]
    carries, running, units, out, carry = [], [], [], [], 0
    for k in range(N_OUT):
        carries.append(carry)
        running.append(s[k] + carry)
        units.append(sum(pp[i][k - i] % 10 for i in range(DIGITS) if 0 <= k - i < DIGITS) + carry)
        out.append(running[-1] % 10)
        carry = running[-1] // 10
    assert carry == 0 and sum(d * 10**k for k, d in enumerate(out)) == a * b
    return {
        "op": "mul", "a": a, "b": b, "result": a * b, "a_digits": ad, "b_digits": bd, "result_digits": out,
        "partial_products": pp, "column_sums": s, "carries": carries, "running_sums": running,
        "unit_sums": units,
        "row_products": [a * bd[j] for j in range(DIGITS)],  # a·b_j, the P_j of the chain of thought / 10**j
    }  # fmt: skip


def cot_text(a: int, b: int) -> str:
    """The explicit chain of thought for a × b (COT_LEN characters): "P0+P1:S1+P2:S2+P3", all LSB first."""
    bd = digits_lsb(b, DIGITS)
    rows = [a * bd[j] * 10**j for j in range(DIGITS)]
    parts = []
    for part in COT_PARTS:
        if len(part) == 1:
            parts.append(part[0])
            continue
        kind, j, width = part
        value = rows[j] if kind == "P" else sum(rows[: j + 1])
        parts.append("".join(map(str, digits_lsb(value, width))))
    return "".join(parts)


def problem_text(a: int, b: int, *, removed: int = COT_LEN) -> tuple[str, str]:
    """(prompt, target) texts: prompt "a*b$" (LSB first), target = COT minus its first `removed` tokens, then
    "=" and the 8 output digits. `removed=0` is the explicit chain of thought, `COT_LEN` (default) none."""
    if not 0 <= removed <= COT_LEN:
        raise ArithInterpError(f"removed={removed} must lie in 0..{COT_LEN} (chain-of-thought tokens removed).")
    prompt = "".join(map(str, digits_lsb(a, DIGITS))) + "*" + "".join(map(str, digits_lsb(b, DIGITS))) + "$"
    return prompt, cot_text(a, b)[removed:] + "=" + "".join(map(str, digits_lsb(a * b, N_OUT)))


# ---------------------------------------------------------------------------------------------------------
# Vectorised encoding for training


def _digit_tokens(x: Int[Tensor, " batch"], width: int) -> Int[Tensor, "batch width"]:
    return (x[:, None] // 10 ** torch.arange(width)) % 10 + _D0


def cot_tokens(a: Int[Tensor, " batch"], b: Int[Tensor, " batch"]) -> Int[Tensor, "batch cot"]:
    """Token ids of `cot_text` for a batch (same text, computed on tensors)."""
    n = a.shape[0]
    bd = (b[:, None] // 10 ** torch.arange(DIGITS)) % 10  # (batch, digit)
    rows = a[:, None] * bd * 10 ** torch.arange(DIGITS)  # (batch, j): P_j
    cols = []
    for part in COT_PARTS:
        if len(part) == 1:
            cols.append(torch.full((n, 1), _STOI[part[0]]))
        else:
            kind, j, width = part
            value = rows[:, j] if kind == "P" else rows[:, : j + 1].sum(1)
            cols.append(_digit_tokens(value, width))
    return torch.cat(cols, 1)


def encode(a: Int[Tensor, " batch"], b: Int[Tensor, " batch"], removed: int = COT_LEN) -> Int[Tensor, "batch seq"]:
    """Token ids of "<bos>" + prompt + target + "<eos>" (see `problem_text`) for a batch."""
    n = a.shape[0]
    col = lambda tok: torch.full((n, 1), _STOI[tok])  # noqa: E731
    parts = [col("<bos>"), _digit_tokens(a, DIGITS), col("*"), _digit_tokens(b, DIGITS), col("$")]
    parts += [cot_tokens(a, b)[:, removed:], col("="), _digit_tokens(a * b, N_OUT), col("<eos>")]
    return torch.cat(parts, 1)


def encode_removed(a: Int[Tensor, " batch"], b: Int[Tensor, " batch"],
                   removed: Int[Tensor, " batch"]) -> Int[Tensor, "batch seq"]:  # fmt: skip
    """`encode` with its own number of removed CoT tokens per example (removal smoothing per example, as Deng et
    al.): row i is `encode(a[i:i+1], b[i:i+1], removed[i])`, right-padded with "<pad>" to the longest row. The pads
    follow "<eos>", so under causal attention they change no logit at a real position; `target_cross_entropy`
    leaves them out of the loss."""
    removed = torch.as_tensor(removed, dtype=torch.long)
    if removed.shape != a.shape or removed.numel() == 0 or not bool(((removed >= 0) & (removed <= COT_LEN)).all()):
        raise ArithInterpError(f"removed must hold one count in 0..{COT_LEN} per example; got {removed.tolist()}.")
    full = encode(a, b, 0)  # (batch, NO_COT_LEN + COT_LEN)
    width = full.shape[1] - int(removed.min())
    pos = torch.arange(width)[None, :]
    src = torch.where(pos < PREFIX, pos, pos + removed[:, None])  # skip the first removed[i] CoT tokens
    inside = src < full.shape[1]
    seq = full.gather(1, src.clamp(max=full.shape[1] - 1))
    return torch.where(inside, seq, _STOI["<pad>"])


def kept_position_ids(removed: Int[Tensor, " batch"], width: int) -> Int[Tensor, "batch width"]:
    """Position ids under `keep_position` for rows of `width` tokens with `removed[i]` CoT tokens removed: the
    prompt keeps 0..PREFIX-1, every later token the position it has in the full chain-of-thought format (its index
    plus removed[i]). Unlike Deng et al.'s code, which also shifts the separator before the chain of thought, the
    prompt is the same in every stage."""
    pos = torch.arange(width)[None, :]
    return pos + torch.where(pos >= PREFIX, torch.as_tensor(removed)[:, None], 0)


def bake_positions(model, removed: int):
    """A copy of a `keep_position` model that computes, with ordinary positions 0, 1, ... on the format with
    `removed` CoT tokens removed, exactly what `model` computes there with kept positions: its position table
    row j (j >= PREFIX) is `model`'s row j + removed. `bake_positions(model, COT_LEN)` is the shipped no-cot model;
    rows past the longest sequence of that format keep their values (nothing reads them)."""
    import copy

    baked = copy.deepcopy(model)
    table, n = model.transformer.wpe.weight, model.transformer.wpe.weight.shape[0]
    with torch.no_grad():
        baked.transformer.wpe.weight[PREFIX : n - removed] = table[PREFIX + removed :]
    return baked


def format_model(model, sched: Mul4Schedule, removed: int):
    """The model to run with ordinary positions on the format with `removed` tokens removed: `model` itself, or
    under `sched.keep_position` its `bake_positions` copy."""
    return bake_positions(model, removed) if sched.keep_position else model


def held_out(seed: int, n: int) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
    """The held-out test problems (drawn with seed 10_000 + seed; never in a training batch)."""
    return random_pairs(n, 10_000 + seed, DIGITS)


#: validation problems that decide adaptive stage ends (`Mul4Schedule.advance_at`)
VALIDATION_N = 500


def validation(seed: int) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
    """The validation problems (seed 20_000 + seed). Kept apart from the held-out test problems, which no training
    decision sees; unlike those they are not excluded from training batches (each is drawn with probability
    ~batch/10**8 per step)."""
    return random_pairs(VALIDATION_N, 20_000 + seed, DIGITS)


class ProblemSampler:
    """Random 4-digit operand pairs (0..9999, zero-padded), never a held-out pair: uniform, except that a share
    `large_digit_share` of each batch (rounded) has every operand digit drawn uniformly from 5..9, the problems
    with the largest partial products and carries, which a uniform draw rarely makes. With share 0 the draws are
    exactly those of the uniform sampler (runs started before the option resume unchanged)."""

    def __init__(self, seed: int, n_test: int, large_digit_share: float = 0.0):
        ta, tb = held_out(seed, n_test)
        self.banned = torch.sort(ta * 10**DIGITS + tb).values
        self.large_digit_share = large_digit_share

    def __call__(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        n_large = round(self.large_digit_share * n)
        a, b = self._uniform(n - n_large, g)
        if n_large == 0:
            return a, b
        la, lb = self._large(n_large, g)
        return torch.cat([a, la]), torch.cat([b, lb])

    def _uniform(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        hi = 10**DIGITS
        return self._first_allowed(torch.randint(0, hi, (2 * n,), generator=g),
                                   torch.randint(0, hi, (2 * n,), generator=g), n)  # fmt: skip

    def _large(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """`n` pairs whose eight digits all lie in 5..9 (not held out)."""
        place = 10 ** torch.arange(DIGITS)
        a = (torch.randint(5, 10, (2 * n, DIGITS), generator=g) * place).sum(1)
        b = (torch.randint(5, 10, (2 * n, DIGITS), generator=g) * place).sum(1)
        return self._first_allowed(a, b, n)

    def _first_allowed(self, a: Tensor, b: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """The first `n` of the candidate pairs (a, b) that are not held out."""
        keep = ~_in_sorted(self.banned, a * 10**DIGITS + b)
        return a[keep][:n], b[keep][:n]


def _in_sorted(keys: Int[Tensor, " m"], query: Int[Tensor, " n"]) -> Tensor:
    """Which of `query` occur in the sorted `keys` (problems as keys a·10⁴ + b)."""
    if len(keys) == 0:
        return torch.zeros(len(query), dtype=torch.bool)
    return keys[torch.searchsorted(keys, query).clamp(max=len(keys) - 1)] == query


# ---------------------------------------------------------------------------------------------------------
# Training configuration


@dataclass(frozen=True, kw_only=True)
class Mul4Schedule:
    """What differs between the three multiplication tasks (model size and optimiser live in TrainConfig)."""

    remove_per_stage: int = 8  # chain-of-thought tokens removed per internalization stage (0: no-cot throughout)
    steps_per_stage: int = 3500  # steps of every stage but the last (which gets the remaining steps)
    smoothing: float = 4.0  # removal smoothing (Deng et al.): extra removed tokens o ~ exp(-smoothing·o); 0 = off
    # "batch": one offset o per batch (every row of a batch in the same format); "example": one per example, as
    # in Deng et al.'s code (the rows padded to one length). Same share of shifted rows, but "batch" feeds
    # the optimiser a batch of shifted rows about every 1 / (1 - exp(-smoothing)) ≈ 55 steps (smoothing 4).
    smoothing_per: str = "batch"
    # Deng et al.'s --keep_position: every token after the prompt keeps the position it has in the full chain-of-
    # thought format, so removing tokens shifts nothing; the answer always sits at positions 56..63. The shipped
    # model then has its position table rewritten for the no-cot format (`bake_positions`), so that it is an
    # ordinary GPT-2 there.
    keep_position: bool = False
    aux_weight: float = 0.0  # weight of the running-sum regression loss (mul4-aux; mul4-icot may have it too)
    aux_scale: float = 10.0  # the head regresses ĉ_k / aux_scale
    # What the heads regress: "sum", ĉ_k / aux_scale (Bai et al.'s running-sum probe); "phase", cos and sin of
    # 2π ĉ_k / 10 (two heads per digit), the period-10 Fourier code of ĉ_k, from which c_k = ĉ_k mod 10 is read
    # off directly. "phase" is this project's variant, not the paper's. "units", also this project's: U_k / aux_scale,
    # U_k = Σ_{i+j=k} (a_i·b_j mod 10) + r_{k-1} (`unit_sums`), which is ≡ ĉ_k mod 10 but spans 0..~71 instead of
    # 0..~360, so the last MLP's mod 10 has a seventh as many periods to cut.
    aux_target: str = "sum"
    # Adaptive stages: a stage also ends at the first evaluation (every eval_every steps) at which the whole target
    # of its format is exact on this share of `VALIDATION_N` validation problems; steps_per_stage is then the most
    # a stage gets. None: every stage lasts steps_per_stage (a fixed schedule, as Deng et al.'s; their code removes
    # one token every 1/8 epoch, i.e. remove_per_stage=1).
    advance_at: float | None = None
    # Chain-of-thought tokens removed in the first stage (Deng et al.'s --remove_start_from): with `init_from`, a
    # run can take up the internalization of a model that has internalized them already. 44 (COT_LEN) runs only
    # the last stage, the no-cot format: it finishes a line whose stages so far ran as other runs.
    start_removed: int = 0
    # Initial weights: a training run's folder (its latest checkpoint) or a model folder (a built-in name
    # included). "" = a fresh random initialisation. Recorded with the step it came from in `<out>/init.json`.
    init_from: str = ""
    # Share of each training batch whose operand digits are all drawn from 5..9 (`ProblemSampler`): problems
    # with large running sums and carries (ĉ_3 up to ~330), which make up a small tail of the uniform draw and
    # are where a plain model's last errors sit. 0 = uniform batches. Evaluation stays on uniform problems.
    large_digit_share: float = 0.0
    # With `init_from`: auxiliary heads that start fresh (the source has none, or regresses another aux_target) are
    # first fitted by least squares to the source model's last-layer attention outputs (`fit_aux_heads`, on
    # AUX_FIT_PROBLEMS training-distribution problems), so that the first steps' aux loss is the source's own
    # linear-readout error and not that of random heads, whose gradients would otherwise reshape the trained weights
    # until the heads catch up. False: fresh heads keep their random initialisation (as runs before the option).
    aux_heads_fit: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.remove_per_stage <= COT_LEN:
            raise ArithInterpError(f"remove_per_stage={self.remove_per_stage} must lie in 0..{COT_LEN}.")
        if not 0 <= self.start_removed <= COT_LEN or (self.start_removed and not self.remove_per_stage):
            raise ArithInterpError(f"start_removed={self.start_removed} must lie in 0..{COT_LEN} ({COT_LEN}: only "
                                   "the last stage, no chain of thought left), and be 0 without chain of thought "
                                   "(remove_per_stage=0).")  # fmt: skip
        if self.smoothing_per not in ("batch", "example"):
            raise ArithInterpError(f"smoothing_per={self.smoothing_per!r} must be 'batch' (one removal-smoothing "
                                   "offset per batch) or 'example' (one per example, as Deng et al.).")  # fmt: skip
        if self.keep_position and not self.remove_per_stage:
            raise ArithInterpError("keep_position=true only applies to stepwise internalization "
                                   "(remove_per_stage > 0).")  # fmt: skip
        if self.steps_per_stage < 1:
            raise ArithInterpError(f"steps_per_stage={self.steps_per_stage} must be >= 1.")
        if self.smoothing < 0 or self.aux_weight < 0 or self.aux_scale <= 0:
            raise ArithInterpError("smoothing and aux_weight must be >= 0 and aux_scale > 0.")
        if self.aux_target not in AUX_TARGETS:
            raise ArithInterpError(f"aux_target={self.aux_target!r} must be one of {', '.join(AUX_TARGETS)}: 'sum' "
                                   "regresses ĉ_k / aux_scale, 'phase' cos and sin of 2π ĉ_k / 10, 'units' "
                                   "U_k / aux_scale (the units digits of the partial products plus the carry)."
                                   )  # fmt: skip
        if not 0 <= self.large_digit_share <= 1:
            raise ArithInterpError(f"large_digit_share={self.large_digit_share} must lie in 0..1 (the share of each "
                                   "batch drawn with every operand digit in 5..9; 0 = uniform batches).")  # fmt: skip
        if self.aux_heads_fit and not (self.init_from and self.aux_weight > 0):
            raise ArithInterpError("aux_heads_fit=true fits the auxiliary heads to a warm start's attention "
                                   "outputs: it needs init_from (a run or model folder) and "
                                   "aux_weight > 0.")  # fmt: skip
        if self.advance_at is not None and not 0 < self.advance_at <= 1:
            raise ArithInterpError(f"advance_at={self.advance_at} must lie in (0, 1] (a share of exact answers), "
                                   "or be None for fixed-length stages.")  # fmt: skip

    @property
    def removals(self) -> list[int]:
        """Chain-of-thought tokens removed in each stage: [0, 8, ..., 40, 44] for icot, [44] without CoT
        ([start_removed, start_removed + remove_per_stage, ..., 44] where the run starts later)."""
        if self.remove_per_stage == 0:
            return [COT_LEN]
        return list(range(self.start_removed, COT_LEN, self.remove_per_stage)) + [COT_LEN]

    def stage_at(self, step: int) -> int:
        return min(step // self.steps_per_stage, len(self.removals) - 1)

    def stage_start(self, stage: int) -> int:
        return stage * self.steps_per_stage


class StageClock:
    """Which internalization stage a step is in, and where that stage began.

    With a fixed schedule this is `Mul4Schedule.stage_at` / `stage_start`. With `advance_at`, a stage ends either
    when `advance` is called (its validation accuracy reached the threshold) or after `steps_per_stage` steps; the
    stage starts are then state, saved in the checkpoint (`state_dict`) so that a resumed run keeps them.
    """

    def __init__(self, sched: Mul4Schedule):
        self.sched = sched
        self.starts = [0]  # first step of each stage ended by `advance` so far, and of the stages before it

    @property
    def adaptive(self) -> bool:
        return self.sched.advance_at is not None

    def starts_at(self, step: int) -> list[int]:
        """The first step of every stage begun by `step`: the recorded starts, then one every `steps_per_stage`
        steps while the current stage has run out of steps. A pure read: nothing is recorded."""
        if not self.adaptive:
            return [self.sched.stage_start(s) for s in range(self.sched.stage_at(step) + 1)]
        starts, last = list(self.starts), len(self.sched.removals) - 1
        while len(starts) - 1 < last and step - starts[-1] >= self.sched.steps_per_stage:
            starts.append(starts[-1] + self.sched.steps_per_stage)  # the stage ran out of steps
        return starts

    def stage(self, step: int) -> int:
        return self.sched.stage_at(step) if not self.adaptive else len(self.starts_at(step)) - 1

    def start(self, stage: int) -> int:
        if not self.adaptive:
            return self.sched.stage_start(stage)
        beyond = stage - (len(self.starts) - 1)  # stages begun since the last recorded start ran out of steps
        return self.starts[stage] if beyond <= 0 else self.starts[-1] + beyond * self.sched.steps_per_stage

    def advance(self, step: int) -> None:
        """End the stage of the steps before `step` (the one just evaluated): the next stage begins at `step`.
        A no-op in the last stage, and where a stage begins at `step` already (the evaluated one ran out of steps
        there): advancing again would skip that stage."""
        starts = self.starts_at(step)
        if len(starts) < len(self.sched.removals) and starts[-1] != step:
            self.starts = starts + [step]

    def state_dict(self) -> dict:
        return {"starts": list(self.starts)}

    @classmethod
    def restored(cls, sched: Mul4Schedule, state: dict | None) -> StageClock:
        """The clock of a checkpoint `state` (its recorded stage starts; none in checkpoints of fixed schedules or
        from before adaptive stages), or a fresh one where `state` is None."""
        clock = cls(sched)
        if state is not None and "stages" in state:
            clock.load_state_dict(state["stages"])
        return clock

    def load_state_dict(self, state: dict) -> None:
        self.starts = list(state["starts"])


SCHEDULES: dict[str, Mul4Schedule] = {
    "mul4-icot": Mul4Schedule(remove_per_stage=8),
    "mul4-sft": Mul4Schedule(remove_per_stage=0, smoothing=0.0),
    # weight 20 on (ĉ/10)² = 0.2 on the squared error of ĉ itself: an error of 1.5 in ĉ costs 0.45, comparable to
    # the cross-entropy (a first run with weight 1 fitted ĉ only to ±1.5, too coarse to fix c_k = ĉ_k mod 10).
    "mul4-aux": Mul4Schedule(remove_per_stage=0, smoothing=0.0, aux_weight=20.0),
}

#: TrainConfig fields of the three tasks: 2 layers and 4 heads as in Bai et al., width 256 instead of 768 (a model
#: of 6 MB), batch 512. Sized for one GPU: the three built-ins trained side by side in 12 minutes on an H100
#: (`benchmarks/mul4_train_device.py`); on 2 CPU cores the same run is resumable but takes tens of hours (0.15
#: steps/s with the chain of thought, 0.8 without). Defined in arithinterp.train (its registry needs them without
#: importing this module).
TRAIN_DEFAULTS: dict[str, Any] = _MUL4_DEFAULTS
N_POSITIONS = PREFIX + COT_LEN + 1 + N_OUT + 1  # the longest sequence (explicit CoT): 65 tokens
N_POSITIONS_MODEL = 72  # the models' position table: N_POSITIONS rounded up


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def target_labels(removed: int = COT_LEN) -> list[str]:
    """A distinct name for every target token of the format with `removed` CoT tokens removed: "P1[2]" (digit 2 of
    P_1, LSB first), "S2[0]", a separator with the index of the part it precedes ("+1" before P_1, ":2" before
    S_2), "=", then "c0".."c7" for the output digits (the "<eos>" is not a target here)."""
    names = []
    for i, part in enumerate(COT_PARTS):
        if len(part) == 1:  # a separator, named after the part it precedes
            names.append(f"{part[0]}{COT_PARTS[i + 1][1]}")
        else:
            names += [f"{part[0]}{part[1]}[{d}]" for d in range(part[2])]
    return names[removed:] + ["="] + [f"c{k}" for k in range(N_OUT)]


@torch.no_grad()
def _target_hits(model, a: Tensor, b: Tensor, removed: int, batch_size: int) -> Tensor:
    """(n, target tokens + eos) booleans: the argmax under teacher forcing is the target token."""
    from arithinterp.train import model_device

    full = encode(a, b, removed)
    first = PREFIX  # index of the first target token
    hits = []
    device = model_device(model)
    for i in range(0, len(a), batch_size):
        seq = full[i : i + batch_size].to(device)
        pred = model(seq[:, :-1]).logits.argmax(-1)
        hits.append((pred[:, first - 1 :] == seq[:, first:]).cpu())
    return torch.cat(hits)


@torch.no_grad()
def evaluate(model, seed: int, n: int, removed: int = COT_LEN, batch_size: int = 500,
             problems: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:  # fmt: skip
    """Held-out accuracy (the first `n` of `held_out(seed, ...)`, or of `problems`) in the format with `removed` CoT
    tokens removed.

    `exact_match`: the whole target (remaining CoT, "=", the 8 digits) is the argmax at every position under
    teacher forcing, which is exactly when greedy decoding writes it; `answer_exact_match` the same for the
    8 output digits alone (equal to greedy exact match in the no-cot format); `digit_accuracy` the share of
    output digits that are the argmax given the correct earlier tokens.
    """
    a, b = held_out(seed, n) if problems is None else (problems[0][:n], problems[1][:n])
    hit = _target_hits(model, a, b, removed, batch_size)  # (n, target + eos)
    ans = hit[:, -(N_OUT + 1) : -1]  # the 8 output digits
    return {"exact_match": hit[:, :-1].all(1).float().mean().item(),
            "answer_exact_match": ans.all(1).float().mean().item(),
            "digit_accuracy": ans.float().mean().item()}  # fmt: skip


def token_accuracy(model, seed: int, n: int, removed: int = COT_LEN, batch_size: int = 500) -> dict[str, float]:
    """Per target token (named by `target_labels`), the share of the first `n` held-out problems on which it is
    the argmax given the correct earlier tokens: which part of its remaining chain of thought a model in an
    internalization stage fails to write."""
    a, b = held_out(seed, n)
    hit = _target_hits(model, a, b, removed, batch_size)[:, :-1].float().mean(0)
    return dict(zip(target_labels(removed), hit.tolist(), strict=True))


@torch.no_grad()
def cot_reliance(model, a: Int[Tensor, " n"], b: Int[Tensor, " n"], removed: int, *, seed: int = 0,
                 batch_size: int = 500) -> tuple[list[str], list[str], Float[Tensor, "target source"]]:  # fmt: skip
    """Which written chain-of-thought digits a model's predictions read, in the format with `removed` tokens gone.

    For every remaining CoT digit token s (the sources; separators are left out), s is replaced in each problem by
    another digit (a random nonzero shift mod 10, drawn with `seed`) while everything else stays teacher-forced;
    entry [t, s] is the share of problems whose argmax at target token t changes. A model that reads its written
    running sum to get c_3 has a large [c3, S2[3]]; one that computes c_3 from the operands has ~0 there. Targets
    at or before s cannot see it (causal attention) and are NaN. Returns (target labels, source labels, matrix).
    """
    from arithinterp.train import model_device

    seq = encode(a, b, removed)
    labels = target_labels(removed)
    sources = [i for i, name in enumerate(labels) if name[0] in "PS"]  # CoT digits (indices into labels)
    device, g = model_device(model), torch.Generator().manual_seed(seed)

    def argmax(tokens: Tensor) -> Tensor:
        out = [model(tokens[i : i + batch_size, :-1].to(device)).logits.argmax(-1).cpu()
               for i in range(0, len(tokens), batch_size)]  # fmt: skip
        return torch.cat(out)[:, PREFIX - 1 :]  # (n, target): the prediction of each target token

    base = argmax(seq)
    changed = torch.full((len(labels), len(sources)), float("nan"))
    for col, i in enumerate(sources):
        edited = seq.clone()
        shift = torch.randint(1, 10, (len(a),), generator=g)
        edited[:, PREFIX + i] = (seq[:, PREFIX + i] - _D0 + shift) % 10 + _D0
        changed[i + 1 :, col] = (argmax(edited)[:, i + 1 : len(labels)] != base[:, i + 1 : len(labels)]).float().mean(0)
    return labels, [labels[i] for i in sources], changed


@torch.no_grad()
def greedy_eval(model, seed: int, n: int, batch_size: int = 500,
                problems: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:  # fmt: skip
    """Greedy generation of the 8 output digits in the no-cot format on the first `n` of `held_out(seed, ...)`
    (or of `problems`): exact match and per-digit accuracy."""
    from arithinterp.train import greedy_answers

    a, b = held_out(seed, n) if problems is None else (problems[0][:n], problems[1][:n])
    if len(a) == 0:
        raise ArithInterpError("greedy_eval got no problems to evaluate; pass n >= 1 and a non-empty problem set.")
    seq = encode(a, b)
    pred = greedy_answers(model, seq[:, : EQ_POS + 1], N_OUT, batch_size=batch_size)
    target = seq[:, EQ_POS + 1 : EQ_POS + 1 + N_OUT]
    per_digit = (pred == target).float().mean(0)
    return {"exact_match": (pred == target).all(1).float().mean().item(),
            "digit_accuracy": (pred == target).float().mean().item(),
            "digit_accuracy_per_k": [round(x, 4) for x in per_digit.tolist()]}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# The auxiliary running-sum head


class AuxHeads(torch.nn.Module):
    """Linear heads on the last layer's attention output at the positions predicting each output digit: eq + k for
    c_k, where eq is the index of "=" (the position predicting c_0): EQ_POS in the no-cot format, later where
    chain-of-thought tokens remain (`eq` per row, as `equals_index` gives).

    `target="sum"`: one head per digit, ĉ_k / scale ≈ w_k · attn_out[eq + k] + b_k (Bai et al.'s running-sum
    probe). `target="phase"`: two per digit, regressing cos and sin of 2π ĉ_k / 10; `target="units"`: one per digit,
    U_k / scale (`unit_sums`; see `Mul4Schedule.aux_target`). `targets(a, b)` gives what they regress, `values(a, b)`
    the numbers behind it (ĉ_k or U_k; ĉ_k for "phase"), `digits(out)` the c_k they imply."""

    def __init__(self, d_model: int, target: str = "sum", scale: float = 10.0):
        super().__init__()
        if target not in AUX_TARGETS:
            raise ArithInterpError(f"aux target {target!r} must be one of {', '.join(AUX_TARGETS)}.")
        self.target, self.scale = target, scale
        self.per_digit = 2 if target == "phase" else 1
        self.linear = torch.nn.Linear(d_model, N_OUT * self.per_digit)

    def forward(self, attn_out: Float[Tensor, "batch pos d_model"], eq: Int[Tensor, " batch"] | None = None
                ) -> Float[Tensor, "batch digit *two"]:  # fmt: skip
        x = self.read(attn_out, eq)
        w = self.linear.weight.view(N_OUT, self.per_digit, -1)
        out = torch.einsum("bkd,kpd->bkp", x, w) + self.linear.bias.view(N_OUT, self.per_digit)
        return out[..., 0] if self.per_digit == 1 else out

    @staticmethod
    def read(attn_out: Float[Tensor, "batch pos d_model"], eq: Int[Tensor, " batch"] | None = None
             ) -> Float[Tensor, "batch digit d_model"]:  # fmt: skip
        """What the heads read: `attn_out` at the positions predicting c_0..c_7 (eq + k)."""
        eq = torch.full(attn_out.shape[:1], EQ_POS) if eq is None else eq
        idx = eq.to(attn_out.device)[:, None] + torch.arange(N_OUT, device=attn_out.device)
        return attn_out.gather(1, idx[:, :, None].expand(-1, -1, attn_out.shape[-1]))

    def values(self, a: Int[Tensor, " batch"], b: Int[Tensor, " batch"]) -> Float[Tensor, "batch digit"]:
        """The number per digit the heads' target is made of: U_k for "units", else ĉ_k."""
        return unit_sums(a, b) if self.target == "units" else running_sums(a, b)

    def targets(self, a: Int[Tensor, " batch"], b: Int[Tensor, " batch"]) -> Float[Tensor, "batch digit *two"]:
        values = self.values(a, b)
        if self.target in SCALAR_AUX_TARGETS:
            return values / self.scale
        angle = 2 * torch.pi * values / 10
        return torch.stack([angle.cos(), angle.sin()], -1)

    def digits(self, out: Float[Tensor, "batch digit *two"]) -> Int[Tensor, "batch digit"]:
        """The output digits c_k the heads' outputs imply: round(ĉ_k) (or round(U_k)) mod 10, or the nearest of
        the ten phases."""
        if self.target in SCALAR_AUX_TARGETS:
            return (out * self.scale).round().long().remainder(10)
        turns = torch.atan2(out[..., 1], out[..., 0]) / (2 * torch.pi)
        return (turns * 10).round().long().remainder(10)


def equals_index(seq: Int[Tensor, "batch seq"]) -> Int[Tensor, " batch"]:
    """The index of "=" in each row (rows of `encode` / `encode_removed`, in any stage's format)."""
    hit = seq == _STOI["="]
    if not bool((hit.sum(1) == 1).all()):
        raise ArithInterpError('every row must hold exactly one "="; pass rows made by mul4.encode.')
    return hit.int().argmax(1)


def _column_sums(a: Int[Tensor, " batch"], b: Int[Tensor, " batch"], modulus: int | None = None
                 ) -> Int[Tensor, "batch digit"]:  # fmt: skip
    """Σ_{i+j=k} a_i·b_j per place k, or of (a_i·b_j mod `modulus`)."""
    ad = (a[:, None] // 10 ** torch.arange(DIGITS)) % 10
    bd = (b[:, None] // 10 ** torch.arange(DIGITS)) % 10
    pp = ad[:, :, None] * bd[:, None, :]  # (batch, i, j)
    pp = pp % modulus if modulus else pp
    s = torch.zeros(a.shape[0], N_OUT, dtype=torch.long)
    for i in range(DIGITS):
        s[:, i : i + DIGITS] += pp[:, i]
    return s


def running_sums(a: Int[Tensor, " batch"], b: Int[Tensor, " batch"]) -> Float[Tensor, "batch digit"]:
    """ĉ_k for a batch (tensor version of `mul4_meta(...)["running_sums"]`)."""
    s = _column_sums(a, b)
    out, carry = [], torch.zeros_like(a)
    for k in range(N_OUT):
        out.append(s[:, k] + carry)
        carry = out[-1] // 10
    return torch.stack(out, 1).float()


def unit_sums(a: Int[Tensor, " batch"], b: Int[Tensor, " batch"]) -> Float[Tensor, "batch digit"]:
    """U_k = Σ_{i+j=k} (a_i·b_j mod 10) + r_{k-1}: the units digits of column k's partial products plus the carry
    into place k (`mul4_meta`'s "carries"). U_k ≡ ĉ_k (mod 10), so c_k = U_k mod 10, and U_k ≤ 4·9 + r_{k-1}."""
    return _column_sums(a, b, 10).float() + carries_in(a, b)


def carries_in(a: Int[Tensor, " batch"], b: Int[Tensor, " batch"]) -> Float[Tensor, "batch digit"]:
    """r_{k-1} = ĉ_{k-1} // 10, the carry into place k (0 for k = 0): the tensor version of `mul4_meta`'s
    "carries"."""
    running = running_sums(a, b)
    return torch.cat([torch.zeros(a.shape[0], 1), running[:, :-1] // 10], 1)


def target_cross_entropy(logits: Float[Tensor, "batch pos vocab"], seq: Int[Tensor, "batch seq"]) -> Tensor:
    """The training loss: mean cross-entropy of every target token of `seq` (all after the prompt "<bos>a*b$": the
    remaining chain of thought, "=", the answer and <eos>), from the `logits` of `seq[:, :-1]`. "<pad>" targets (the
    padding of `encode_removed`) are left out of the mean."""
    return F.cross_entropy(logits[:, PREFIX - 1 :].reshape(-1, logits.shape[-1]), seq[:, PREFIX:].reshape(-1),
                           ignore_index=_STOI["<pad>"])  # fmt: skip


def load_aux_heads(source: str | Path) -> AuxHeads:
    """The auxiliary heads of a run trained with the running-sum loss (aux_weight > 0), with the target and scale
    they were trained on: from a run folder's latest checkpoint or a finished model folder (built-in name or path)
    with `aux_heads.safetensors`."""
    from arithinterp.models import resolve

    path = Path(source).expanduser()
    ckpt = path / "checkpoint" / "checkpoint.pt"
    if ckpt.is_file():
        heads = torch.load(ckpt, weights_only=True, map_location="cpu").get("aux")
        card = json.loads((path / "checkpoint" / "settings.json").read_text())
    else:
        location = Path(resolve(str(source))[1])
        heads = _folder_aux_heads(location)
        card = json.loads((location / "arithinterp.json").read_text()) if heads else {}
    if not heads:
        raise ArithInterpError(f"{str(source)!r} has no auxiliary heads (a run or model trained with "
                               "aux_weight > 0, such as aux-mul4, has them).")  # fmt: skip
    sched = Mul4Schedule(**card.get("schedule", {}))
    aux = AuxHeads(heads["linear.weight"].shape[1], sched.aux_target, sched.aux_scale)
    aux.load_state_dict(heads)
    return aux.eval()


def _folder_aux_heads(location: str | Path) -> dict[str, Tensor] | None:
    """A model folder's auxiliary heads (`aux_heads.safetensors`, written for runs with aux_weight > 0), or None."""
    file = Path(location) / "aux_heads.safetensors"
    if not file.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(file)


@torch.no_grad()
def aux_readout(model, aux: AuxHeads, a: Int[Tensor, " n"], b: Int[Tensor, " n"], *, removed: int = COT_LEN,
                batch_size: int = 500) -> dict[str, list[float]]:  # fmt: skip
    """What the auxiliary heads read against what the model writes, per output digit k, on problems (a, b) in
    the format with `removed` chain-of-thought tokens gone, under teacher forcing.

    `head_digit`: the digit the heads imply (`AuxHeads.digits`) is c_k; `model_digit`: the model's argmax at the
    position predicting c_k is c_k; for running-sum heads also `mae`, mean |head_k - ĉ_k|, and `head_exact`, the
    head rounds to ĉ_k. A `head_digit` far above `model_digit` means the last layer's attention output holds
    c_k's information in the heads' code but the model does not turn it into the digit."""
    from arithinterp.train import model_device

    device = model_device(model)
    aux = aux.to(device)
    box, handle = _last_attn_capture(model)
    parts: dict[str, list[Tensor]] = {"head_digit": [], "model_digit": []}
    if aux.target in SCALAR_AUX_TARGETS:
        parts |= {"mae": [], "head_exact": []}
    try:
        for i in range(0, len(a), batch_size):
            ai, bi = a[i : i + batch_size], b[i : i + batch_size]
            seq = encode(ai, bi, removed).to(device)
            logits = model(seq[:, :-1]).logits
            eq = equals_index(seq)
            out = aux(box["attn_out"], eq).cpu()
            idx = eq[:, None] + torch.arange(N_OUT, device=device)
            target = (seq.gather(1, idx + 1) - _D0).cpu()
            parts["head_digit"].append(aux.digits(out) == target)
            parts["model_digit"].append(logits.argmax(-1).gather(1, idx).cpu() - _D0 == target)
            if aux.target in SCALAR_AUX_TARGETS:
                pred, true = out * aux.scale, aux.values(ai, bi)
                parts["mae"].append((pred - true).abs())
                parts["head_exact"].append(pred.round() == true)
    finally:
        handle.remove()
    return {key: [round(x, 4) for x in torch.cat(v).float().mean(0).tolist()] for key, v in parts.items()}


AUX_FIT_PROBLEMS = 4096  # problems `train_mul4` fits fresh auxiliary heads on (Mul4Schedule.aux_heads_fit)
AUX_FIT_SEED_OFFSET = 7919  # their generator's seed is the run's seed plus this


@torch.no_grad()
def fit_aux_heads(model, aux: AuxHeads, a: Int[Tensor, " n"], b: Int[Tensor, " n"], *, removed: int = COT_LEN,
                  ridge: float = 1e-4, batch_size: int = 500) -> list[float]:  # fmt: skip
    """Set `aux`'s weights to the least-squares fit of its targets (`AuxHeads.targets`) on `model`'s last-layer
    attention output at the position predicting each c_k, over problems (a, b) in the format with `removed`
    chain-of-thought tokens gone: one ridge regression per head (penalty `ridge` times the mean squared feature,
    bias unpenalised). Returns each digit's mean squared error of the fit on those problems, in the units of the
    values behind the target (ĉ_k² or U_k²; of cos and sin for "phase"). The model is used as it is (put it in eval
    mode for a deterministic read)."""
    from arithinterp.train import model_device

    if len(a) <= aux.linear.in_features:
        raise ArithInterpError(f"fit_aux_heads: {len(a)} problems cannot fix {aux.linear.in_features} weights a head; "
                               f"pass more than {aux.linear.in_features}.")  # fmt: skip
    device = model_device(model)
    box, handle = _last_attn_capture(model)
    feats = []
    try:
        for i in range(0, len(a), batch_size):
            seq = encode(a[i : i + batch_size], b[i : i + batch_size], removed).to(device)
            model(seq[:, :-1])
            feats.append(aux.read(box["attn_out"], equals_index(seq)).cpu())
    finally:
        handle.remove()
    x = torch.cat(feats).double()  # (n, digit, d)
    y = aux.targets(a, b).double().reshape(len(a), N_OUT, aux.per_digit)  # (n, digit, per_digit)
    n, d = len(a), x.shape[-1]
    x1 = torch.cat([x, torch.ones(n, N_OUT, 1, dtype=x.dtype)], -1).transpose(0, 1)  # (digit, n, d + 1)
    gram = x1.transpose(1, 2) @ x1
    penalty = torch.zeros(d + 1, dtype=x.dtype)
    penalty[:d] = 1.0
    scale = ridge * n * x.pow(2).mean((0, 2))  # per digit
    coef = torch.linalg.solve(gram + scale[:, None, None] * torch.diag(penalty), x1.transpose(1, 2) @ y.transpose(0, 1))
    w = coef[:, :d, :].permute(0, 2, 1)  # (digit, per_digit, d)
    aux.linear.weight.copy_(w.reshape(N_OUT * aux.per_digit, d).to(aux.linear.weight))
    aux.linear.bias.copy_(coef[:, d, :].reshape(-1).to(aux.linear.bias))
    resid = (x1 @ coef - y.transpose(0, 1)).pow(2).mean((1, 2))  # (digit,)
    unit = aux.scale**2 if aux.target in SCALAR_AUX_TARGETS else 1.0
    return [round(float(v) * unit, 4) for v in resid]


@torch.no_grad()
def errors_by_carry(model, a: Int[Tensor, " n"], b: Int[Tensor, " n"], *, removed: int = COT_LEN,
                    edges: Sequence[int] = (0, 5, 10, 15, 20), batch_size: int = 500) -> list[list[dict]]:  # fmt: skip
    """Where a model's output-digit errors sit: for each output digit c_k, its teacher-forced miss rate on the
    problems (a, b) grouped by the carry into column k, r_{k-1} = floor(ĉ_{k-1} / 10) (0 for c_0).

    `edges` are the groups' lower bounds (the last group is open above). Returns, per k, one record per non-empty
    group: `{"carry": "10-14", "n": problems, "miss": share whose c_k is not the argmax}`. On uniform problems
    the carry into column 4 is 10 or more on about 38% and is 20 or more on about 2%, so a model can be right on
    nearly all of the bulk and still miss c_4 on most of the tail; this is the table that shows it."""
    if len(a) == 0:
        raise ArithInterpError("errors_by_carry got no problems; pass at least one (a, b) pair.")
    if list(edges) != sorted(set(edges)) or edges[0] != 0:
        raise ArithInterpError(f"edges={list(edges)} must rise strictly from 0 (the lower bounds of the carry groups).")
    hit = _target_hits(model, a, b, removed, batch_size)[:, -(N_OUT + 1) : -1]  # (n, 8): the output digits
    carry = carries_in(a, b).long()
    bounds = torch.tensor(list(edges))
    group = torch.bucketize(carry, bounds, right=True) - 1  # index of the group whose lower bound <= carry
    names = [f"{lo}-{hi - 1}" if hi - 1 > lo else f"{lo}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    table = []
    for k in range(N_OUT):
        rows = []
        for g, name in enumerate(names):
            mask = group[:, k] == g
            if mask.any():
                rows.append(
                    {"carry": name, "n": int(mask.sum()), "miss": round(1 - hit[mask, k].float().mean().item(), 4)}
                )
        table.append(rows)
    return table


def _last_attn_capture(model) -> tuple[dict, Any]:
    """Forward hook on the last block's attention: keeps its output (= transformer-lens hook_attn_out)."""
    box: dict[str, Tensor] = {}

    def hook(module, args, output):
        box["attn_out"] = output[0] if isinstance(output, tuple) else output

    return box, model.transformer.h[-1].attn.register_forward_hook(hook)


# ---------------------------------------------------------------------------------------------------------
# The training loop


def _lr(cfg, clock: StageClock, step: int) -> float:
    """Linear warm-up at the start of every stage (the optimiser is fresh), cosine decay in the last stage."""
    stage = clock.stage(step)
    start = clock.start(stage)
    if step - start < cfg.warmup:
        return cfg.lr * (step - start + 1) / cfg.warmup
    if stage < len(clock.sched.removals) - 1:
        return cfg.lr
    frac = (step - start - cfg.warmup) / max(1, cfg.steps - start - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _optimizer(cfg, params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))


def _smoothed_removal(sched: Mul4Schedule, base: int, g: torch.Generator) -> int:
    """`base` plus the removal-smoothing offset o with P(o) ∝ exp(-smoothing·o) (Deng et al. 2024)."""
    if sched.smoothing == 0 or base >= COT_LEN:
        return base
    return base + int(torch.multinomial(_offset_weights(sched, base), 1, generator=g))


def _smoothed_removals(sched: Mul4Schedule, base: int, n: int, g: torch.Generator) -> Int[Tensor, " n"]:
    """One `_smoothed_removal` per example (`smoothing_per="example"`), drawn independently."""
    if sched.smoothing == 0 or base >= COT_LEN:
        return torch.full((n,), base)
    return base + torch.multinomial(_offset_weights(sched, base), n, replacement=True, generator=g)


def _offset_weights(sched: Mul4Schedule, base: int) -> Tensor:
    """Unnormalised P(o) ∝ exp(-smoothing·o) for o = 0..COT_LEN - base (never past the no-cot format)."""
    return torch.exp(-sched.smoothing * torch.arange(COT_LEN - base + 1, dtype=torch.float))


def training_batch(sched: Mul4Schedule, removed: int, sampler: ProblemSampler, n: int, gen: torch.Generator
                   ) -> tuple[Tensor, Tensor, Int[Tensor, "n seq"], Int[Tensor, "n pos"] | None]:  # fmt: skip
    """One batch of `train_mul4` in a stage that removes `removed` tokens: (a, b, token rows, position ids or None).

    Removal smoothing adds an offset per example or one per batch (`sched.smoothing_per`); under
    `sched.keep_position` the position ids are those of the full format (`kept_position_ids`), else None (the
    model's own 0..n). The draws from `gen` come in a fixed order, which resuming a run relies on.
    """
    a, b, each = _draw_batch(sched, removed, sampler, n, gen)
    seq = encode_removed(a, b, each) if sched.smoothing_per == "example" else encode(a, b, int(each[0]))
    pos = kept_position_ids(each, seq.shape[1] - 1) if sched.keep_position else None
    return a, b, seq, pos


def _draw_batch(sched: Mul4Schedule, removed: int, sampler: ProblemSampler, n: int, gen: torch.Generator
                ) -> tuple[Tensor, Tensor, Int[Tensor, " n"]]:  # fmt: skip
    """Every draw from `gen` of one `training_batch`, in its order: operands a, b and each row's tokens removed."""
    if sched.smoothing_per == "example":
        a, b = sampler(n, gen)
        return a, b, _smoothed_removals(sched, removed, len(a), gen)
    base = _smoothed_removal(sched, removed, gen)
    a, b = sampler(n, gen)
    return a, b, torch.full((len(a),), base)


def optimizer_step(opt: torch.optim.Optimizer, params: list[Tensor], loss: Tensor) -> None:
    """`train_mul4`'s update: gradients of `loss`, clipped to norm 1 over `params`, one step of `opt`."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _extend_steps(out: Path, settings: dict) -> None:
    """Let a run be resumed with more `steps`, or (adaptive stages) a larger `steps_per_stage`, than it was started
    with, where the longer run would have done everything this one did so far:

    * `steps`, while it has not reached its last stage: until then nothing depended on `steps` (the learning rate
      decays only in the last stage);
    * `steps_per_stage` (the cap of an adaptive stage, `advance_at`), while it has not reached its last stage and
      every stage so far ended by passing `advance_at`, none by running out of steps: the cap then decided nothing
      yet. (A stage slow to pass, stage 32 of `data/runs/icot-b256-from30` took 27,500 of its 30,000, may then be
      given more room before it runs out.)

    Rewrites the recorded settings; any other difference is left for `open_run` to refuse."""
    path, ckpt = out / "checkpoint" / "settings.json", out / "checkpoint" / "checkpoint.pt"
    if not (path.is_file() and ckpt.is_file()):
        return
    old = json.loads(path.read_text())
    if "train_config" not in old or old == settings:
        return
    old_steps, new_steps = old["train_config"]["steps"], settings["train_config"]["steps"]
    old_cap, new_cap = old["schedule"]["steps_per_stage"], settings["schedule"]["steps_per_stage"]
    raised = {"train_config": old["train_config"] | {"steps": new_steps},
              "schedule": old["schedule"] | {"steps_per_stage": new_cap}}  # fmt: skip
    if old | raised != settings:
        return  # other settings differ too: open_run names the mismatch
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    clock = StageClock.restored(Mul4Schedule(**old["schedule"]), state)
    step, last = state["step"], len(clock.sched.removals) - 1
    where = f"{str(out)!r} holds a run with steps={old_steps}, steps_per_stage={old_cap}, at step {step}"
    if new_steps != old_steps and (new_steps < old_steps or clock.stage(step) == last):
        raise ArithInterpError(
            f"{where}; steps can only be raised, and only before the last stage, whose learning rate decays over the "
            f"remaining steps. Pass --set steps={old_steps} to resume it, or another --out."
        )
    if new_cap != old_cap:
        ran_out = clock.starts_at(step) != clock.starts  # a stage ended on the cap: raising it rewrites history
        if new_cap < old_cap or not clock.adaptive or clock.stage(step) == last or ran_out:
            raise ArithInterpError(
                f"{where}; steps_per_stage can only be raised, in a run with adaptive stages (advance_at), before "
                "its last stage, and while every stage so far ended by passing advance_at (none ran out of steps). "
                f"Pass --set steps_per_stage={old_cap} to resume it, or another --out."
            )
    atomic_write_json(path, settings)


def _upgrade_settings(out: Path) -> None:
    """Let a run checkpointed before a `Mul4Schedule` field existed (`advance_at`, `start_removed`,
    `init_from`, `smoothing_per`, `keep_position`) resume: its settings lack the field, whose default is what the
    run did."""
    path = out / "checkpoint" / "settings.json"
    if path.is_file():
        settings = json.loads(path.read_text())
        if "schedule" in settings:
            full = asdict(Mul4Schedule(**settings["schedule"]))
            if full != settings["schedule"]:
                atomic_write_json(path, settings | {"schedule": full})


WIDEN_NOISE = 0.01  # std of the noise added to each widened weight matrix, relative to the matrix's own std


def widen_gpt2_weights(weights: dict[str, Tensor], n_head: int, d_model: int, d_mlp: int, *,
                       noise: float = WIDEN_NOISE, seed: int = 0) -> dict[str, Tensor]:  # fmt: skip
    """A GPT-2 state dict made `d_model` / `d_mlp` wide (integer multiples r, q of its own widths) that computes the
    same function (Net2Net's function-preserving widening, Chen et al. 2016), up to `noise`.

    Every residual coordinate j is copied r times (new coordinate j' holds old j' mod d), so each LayerNorm sees
    the same mean and variance and puts out r copies; weights reading the residual stream are divided by r, so the
    copies sum to the old input. Each head keeps its index and gets r copies of its query/key/value dimensions;
    query and key are scaled by r^(-1/4) so that the scores, now over an r times longer head, stay the same under
    the 1/sqrt(d_head) scaling. Each MLP neuron is copied q times with its output divided by q. The tied
    unembedding reads r copies of the final LayerNorm's output, so `ln_f` is divided by r. Exact copies would get
    exact same gradients and stay copies for good; `noise` (Gaussian, `noise` times each matrix's std, drawn
    with `seed`) on every weight matrix lets them part. With `noise=0` the logits equal the narrow model's to
    rounding error (tested)."""
    d_old, m_old = weights["transformer.wte.weight"].shape[1], weights["transformer.h.0.mlp.c_fc.weight"].shape[1]
    if d_model % d_old or d_mlp % m_old or d_model < d_old or d_mlp < m_old:
        raise ArithInterpError(
            f"cannot widen d_model={d_old}, d_mlp={m_old} to d_model={d_model}, d_mlp={d_mlp}: each new width must "
            "be a whole multiple of the old one (for example twice); pass such sizes with --set."
        )
    if d_old % n_head:
        raise ArithInterpError(f"n_head={n_head} does not divide the source's d_model={d_old}; pass its n_head.")
    r, q, dh = d_model // d_old, d_mlp // m_old, d_old // n_head
    res = torch.arange(d_model) % d_old  # new residual coordinate -> old
    neuron = torch.arange(d_mlp) % m_old
    s = torch.arange(d_model)  # new head-structured index: head (s // (r dh)), dimension (s mod (r dh)) mod dh
    head = (s // (r * dh)) * dh + (s % (r * dh)) % dh
    qk = r**-0.25
    gen = torch.Generator().manual_seed(seed)

    def jitter(t: Tensor) -> Tensor:
        return t + noise * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype) if noise else t

    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        w = w.detach().cpu()
        if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
            new = jitter(w[:, res])
        elif ".ln_" in name and not name.startswith("transformer.ln_f"):
            new = w[res]
        elif name.startswith("transformer.ln_f"):
            new = w[res] / r
        elif name.endswith("attn.c_attn.weight"):  # [d, 3d]: query, key, value blocks
            qw, kw, vw = (w[:, i * d_old : (i + 1) * d_old][res][:, head] / r for i in range(3))
            new = jitter(torch.cat([qw * qk, kw * qk, vw], dim=1))
        elif name.endswith("attn.c_attn.bias"):
            qb, kb, vb = (w[i * d_old : (i + 1) * d_old][head] for i in range(3))
            new = torch.cat([qb * qk, kb * qk, vb])
        elif name.endswith("attn.c_proj.weight"):  # [d (heads), d (residual)]
            new = jitter(w[head][:, res] / r)
        elif name.endswith(("attn.c_proj.bias", "mlp.c_proj.bias")):
            new = w[res]
        elif name.endswith("mlp.c_fc.weight"):  # [d, m]
            new = jitter(w[res][:, neuron] / r)
        elif name.endswith("mlp.c_fc.bias"):
            new = w[neuron]
        elif name.endswith("mlp.c_proj.weight"):  # [m, d]
            new = jitter(w[neuron][:, res] / q)
        elif w.dim() == 0 or name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers
            new = w
        else:
            raise ArithInterpError(f"widen_gpt2_weights: no rule for the GPT-2 weight {name!r} {tuple(w.shape)}.")
        out[name] = new.contiguous()
    if "lm_head.weight" in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]  # tied: one tensor, one draw of noise
    return out


def load_initial_weights(model, source: str, *, seed: int = 0, aux: AuxHeads | None = None) -> dict[str, Any]:
    """Copy the weights of `source` into `model` (a `GPT2LMHeadModel` of the same shape); returns where they came
    from, for `<out>/init.json`.

    `source` is a training run's folder (its latest checkpoint, `<source>/checkpoint/checkpoint.pt`; the record
    then holds the step and the stage table it had reached) or a model folder / built-in name (its weights).
    A source with the same layers and heads but a narrower d_model / d_mlp (whole fractions of `model`'s) is
    widened to fit by `widen_gpt2_weights` (seeded with `seed`); the record then says so under "widened".
    `aux` (the new run's running-sum heads) takes the source's heads where it has some (a checkpoint's, or a model
    folder's `aux_heads.safetensors`) of the same width and `aux_target`; the record's "aux_heads" says whether it
    did and why not, "aux_heads_from_source" (a bool) whether it did.
    """
    from arithinterp.models import resolve

    path = Path(source).expanduser()
    ckpt = path / "checkpoint" / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True, map_location="cpu")
        weights = state["model"]
        record = {"from": source, "kind": "run checkpoint", "step": state["step"],
                  "stages": stage_table(state["log"])}  # fmt: skip
        their_aux = state.get("aux")
        settings = path / "checkpoint" / "settings.json"
        card = json.loads(settings.read_text()) if settings.is_file() else {}
        their_heads = card["train_config"]["n_head"] if card else None
    else:
        try:
            kind, location = resolve(source)
        except ArithInterpError as err:
            raise ArithInterpError(f"init_from={source!r}: {err}") from None
        if kind == "hub":
            raise ArithInterpError(f"init_from={source!r} is neither a run folder (with checkpoint/checkpoint.pt) "
                                   "nor a model folder or built-in name; check the path.")  # fmt: skip
        from transformers import GPT2LMHeadModel

        narrow = GPT2LMHeadModel.from_pretrained(location)
        weights, their_heads = narrow.state_dict(), narrow.config.n_head
        record = {"from": source, "kind": f"{kind} model", "location": location}
        their_aux = _folder_aux_heads(location)
        card_file = Path(location) / "arithinterp.json"
        card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    mine = model.state_dict()
    d_old, d_new = weights["transformer.wte.weight"].shape[1], mine["transformer.wte.weight"].shape[1]
    m_old, m_new = weights["transformer.h.0.mlp.c_fc.weight"].shape[1], mine["transformer.h.0.mlp.c_fc.weight"].shape[1]
    if (d_old, m_old) != (d_new, m_new) and d_new >= d_old and m_new >= m_old and set(weights) == set(mine):
        heads = model.config.n_head
        if their_heads not in (None, heads):
            raise ArithInterpError(f"init_from={source!r} has n_head={their_heads}; widening keeps the heads, so "
                                   f"train with --set n_head={their_heads}.")  # fmt: skip
        weights = widen_gpt2_weights(weights, heads, d_new, m_new, seed=seed)
        record["widened"] = {"d_model": [d_old, d_new], "d_mlp": [m_old, m_new], "noise": WIDEN_NOISE}
    for name, tensor in mine.items():
        if name not in weights or weights[name].shape != tensor.shape:
            theirs = tuple(weights[name].shape) if name in weights else "missing"
            raise ArithInterpError(
                f"init_from={source!r} does not fit the model being trained: {name} is {theirs} there and "
                f"{tuple(tensor.shape)} here. Pass the sizes it was trained with (--set d_model=..., d_mlp=...), "
                "or whole multiples of them to widen it."
            )
    model.load_state_dict({name: weights[name] for name in mine})
    if aux is not None:
        their_target = card.get("schedule", {}).get("aux_target", "sum")  # runs from before aux_target: "sum"
        fits = their_aux is not None and their_aux["linear.weight"].shape == aux.linear.weight.shape
        record["aux_heads_from_source"] = fits and their_target == aux.target
        if record["aux_heads_from_source"]:
            aux.load_state_dict(their_aux)
            record["aux_heads"] = "from the source"
        elif fits:
            record["aux_heads"] = f"fresh (the source's heads regress aux_target={their_target!r}, not {aux.target!r})"
        else:
            record["aux_heads"] = "fresh (the source has none of this width)"
    return record


def train_mul4(cfg, out: str | Path, *, overwrite: bool = False, progress: bool = True,
               max_steps_this_run: int | None = None, max_seconds: float | None = None,
               device: str | torch.device | None = None, schedule: Mul4Schedule | None = None) -> dict:  # fmt: skip
    """Train (or resume) one of the multiplication models into `out` (see the module docstring).

    `cfg` is an `arithinterp.train.TrainConfig` with `task` in TASKS; `schedule` (default: the task's entry in
    SCHEDULES) sets the stages, smoothing and aux loss. A checkpoint (model, optimiser, aux head, step, stage
    starts, random state, log) is written atomically every `cfg.checkpoint_every` steps into `<out>/checkpoint/`;
    calling again with the same settings resumes (also with a larger `cfg.steps`, before the last stage, as a run
    started with it would have gone; see `_extend_steps`). `max_steps_this_run` / `max_seconds` stop early with the
    checkpoint saved. `device` (default cpu) is where the steps run; batches are drawn on the CPU, so a run
    resumes on another device with the same data. Finished: a Hugging Face folder, `training_log.jsonl`,
    `arithinterp.json` (held-out exact match and digit accuracy on `cfg.n_test` problems, training time, device),
    and for mul4-aux `aux_heads.safetensors`.
    """
    from arithinterp.train import (
        build_model,
        device_name,
        finish_run,
        open_run,
        resolve_device,
        restore_checkpoint,
        save_checkpoint,
    )

    if cfg.task not in SCHEDULES:
        raise ArithInterpError(f"task {cfg.task!r} is not a multiplication task; choose one of: {', '.join(TASKS)}.")
    sched = SCHEDULES[cfg.task] if schedule is None else schedule
    removes_cot, has_aux = sched.remove_per_stage > 0, sched.aux_weight > 0
    aux_fits = {"mul4-aux": has_aux, "mul4-sft": not has_aux}.get(cfg.task, True)  # icot: either
    if removes_cot != (cfg.task == "mul4-icot") or not aux_fits:
        raise ArithInterpError(f"schedule {sched} does not fit task {cfg.task!r}: only mul4-icot removes chain-of-"
                               "thought tokens (remove_per_stage > 0); mul4-aux has aux_weight > 0, mul4-sft has "
                               "none, and mul4-icot may have it (the loss on the running sums at its answer "
                               "positions, in every stage).")  # fmt: skip
    before_last = sched.stage_start(len(sched.removals) - 1)  # the most steps the stages before the last take
    if len(sched.removals) > 1 and cfg.steps <= before_last:
        raise ArithInterpError(
            f"steps={cfg.steps} leaves the last stage (no chain of thought, the format the model is evaluated in) "
            f"{'possibly ' if sched.advance_at is not None else ''}no steps: the {len(sched.removals) - 1} stages "
            f"before it take up to {len(sched.removals) - 1} x steps_per_stage={sched.steps_per_stage} = "
            f"{before_last} steps. Pass steps above {before_last} (--set steps=N) or a smaller steps_per_stage."
        )
    out = Path(out)
    _upgrade_settings(out)
    settings = {"train_config": asdict(cfg), "schedule": asdict(sched)}
    _extend_steps(out, settings)
    model = build_model(cfg, N_POSITIONS_MODEL)
    aux = AuxHeads(cfg.d_model, sched.aux_target, sched.aux_scale) if sched.aux_weight > 0 else None
    fresh = not (out / "checkpoint" / "checkpoint.pt").is_file()  # open_run resumes a checkpoint it finds
    # before any write:
    init = (load_initial_weights(model, sched.init_from, seed=cfg.seed, aux=aux)
            if sched.init_from and fresh else None)  # fmt: skip
    sampler = ProblemSampler(cfg.seed, cfg.n_test, sched.large_digit_share)
    if init is not None and sched.aux_heads_fit and aux is not None and not init["aux_heads_from_source"]:
        fit_gen = torch.Generator().manual_seed(cfg.seed + AUX_FIT_SEED_OFFSET)  # not the training batches' stream
        fa, fb = sampler(AUX_FIT_PROBLEMS, fit_gen)
        model.eval()
        mse = fit_aux_heads(model, aux, fa, fb, removed=sched.removals[0])
        model.train()
        why = init["aux_heads"].removeprefix("fresh ")  # "(the source has none ...)", "(the source's heads ...)"
        init["aux_heads"] = f"fitted by least squares to the source's attention outputs on {len(fa)} problems {why}"
        init["aux_heads_fit_mse"] = mse
    state = open_run(out, settings, overwrite=overwrite)
    if init is not None:
        atomic_write_json(out / "init.json", init)
    elif fresh:
        (out / "init.json").unlink(missing_ok=True)  # an overwritten run's record
    device = resolve_device(device)
    model = model.to(device)
    aux = aux.to(device) if aux is not None else None
    params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
    opt = _optimizer(cfg, params)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts = {"model": model, "opt": opt} | ({"aux": aux} if aux is not None else {})
    step, log, elapsed = restore_checkpoint(state, parts, gen) if state is not None else (0, [], 0.0)
    clock = StageClock.restored(sched, state)
    box, handle = _last_attn_capture(model) if aux is not None else ({}, None)

    def save() -> None:
        save_checkpoint(out, parts | {"opt": opt, "stages": clock}, step=step, gen=gen, log=log,
                        elapsed=time.time() - t0)  # fmt: skip

    model.train()
    t0 = time.time() - elapsed
    t_run = time.time()
    stop = cfg.steps if max_steps_this_run is None else min(cfg.steps, step + max_steps_this_run)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.task}", disable=not progress)
    while step < stop:
        stage = clock.stage(step)
        if stage > 0 and step == clock.start(stage):
            opt = _optimizer(cfg, params)  # a fresh optimiser for every stage (Deng et al.)
        a, b, seq, pos = training_batch(sched, sched.removals[stage], sampler, cfg.batch_size, gen)
        seq, pos = seq.to(device), (pos.to(device) if pos is not None else None)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, clock, step)
        ce = target_cross_entropy(model(seq[:, :-1], position_ids=pos).logits, seq)
        loss = ce
        aux_loss = None
        if aux is not None:
            pred = aux(box["attn_out"], equals_index(seq) if removes_cot else None)
            aux_loss = F.mse_loss(pred, aux.targets(a, b).to(device))
            loss = ce + sched.aux_weight * aux_loss
        optimizer_step(opt, params, loss)
        step += 1
        bar.update(1)
        if step % 50 == 0 or step % cfg.eval_every == 0 or step == cfg.steps:
            entry = {"step": step, "stage": stage, "removed": sched.removals[stage], "loss": round(ce.item(), 5),
                     "lr": _lr(cfg, clock, step - 1), "time_s": round(time.time() - t0, 1)}  # fmt: skip
            if aux_loss is not None:
                # "sum" / "units": in units of ĉ² (U²), not (ĉ/scale)²; "phase": of cos and sin
                unit = sched.aux_scale**2 if sched.aux_target in SCALAR_AUX_TARGETS else 1.0
                entry["aux_mse"] = round(aux_loss.item() * unit, 4 if sched.aux_target == "phase" else 3)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                model.eval()
                now = format_model(model, sched, sched.removals[stage])
                entry.update({f"eval_{k}": v for k, v in evaluate(now, cfg.seed, min(cfg.n_test, 500),
                                                                  sched.removals[stage]).items()})  # fmt: skip
                if clock.adaptive and stage < len(sched.removals) - 1 and step < cfg.steps:
                    val = evaluate(now, cfg.seed, VALIDATION_N, sched.removals[stage], problems=validation(cfg.seed))
                    entry["val_exact_match"] = val["exact_match"]
                    if val["exact_match"] >= sched.advance_at:
                        clock.advance(step)  # the next step begins the next stage, with a fresh optimiser
                        entry["advanced"] = True
                model.train()
            log.append(entry)
            shown = {k: v for k, v in entry.items() if k == "eval_exact_match"}
            bar.set_postfix(loss=entry["loss"], stage=stage, **shown)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save()
        if max_seconds is not None and time.time() - t_run > max_seconds:
            break
    bar.close()
    if handle is not None:
        handle.remove()
    if step < cfg.steps:
        save()
        return {"finished": False, "step": step, "stage": clock.stage(step)}
    model = format_model(model.eval(), sched, COT_LEN)  # under keep_position: positions baked in for no-cot
    final = greedy_eval(model, cfg.seed, cfg.n_test)
    wall = time.time() - t0
    model.cpu()
    if aux is not None:
        from safetensors.torch import save

        atomic_write_bytes(out / "aux_heads.safetensors", save(aux.cpu().state_dict()))
    summary = {
        "name": out.name, "description": TASK_DESCRIPTIONS[cfg.task], "task": cfg.task,
        "train_config": asdict(cfg), "schedule": asdict(sched), "held_out": final, "n_test": cfg.n_test,
        **({"stage_starts": clock.starts_at(step)} if clock.adaptive else {}), **_init_record(out),
        "train_time_s": round(wall, 1), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": device_name(device),
        "format": "<bos>a0a1a2a3*b0b1b2b3$=c0c1c2c3c4c5c6c7<eos> (all numbers least significant digit first)",
    }  # fmt: skip
    return finish_run(out, model, log, summary)


TASK_DESCRIPTIONS = {
    "mul4-icot": "4x4-digit multiplication (LSB first), implicit chain of thought by stepwise internalization",
    "mul4-sft": "4x4-digit multiplication (LSB first), trained without chain of thought",
    "mul4-aux": "4x4-digit multiplication (LSB first), no chain of thought + auxiliary running-sum loss",
}


# ---------------------------------------------------------------------------------------------------------
# Datasets for the analyses (the `arithinterp.tasks.Dataset` of task "mul4")


def mul4_dataset(tokenizer, config):
    """The no-cot format as an `arithinterp.tasks.Dataset` (`make_dataset(..., task="mul4")` lands here).

    Clean prompt: "<bos>a*b$=" followed by the first `config.answer_token` output digits (teacher forcing); the
    scored answer is c_k, k = `config.answer_token` (0..7). The counterfactual prompt is another random problem
    (operands drawn independently) with its own first k digits. Operands are uniform in 0..9999 unless
    `config.operand_range` says otherwise; `meta` holds everything of `mul4_meta`.
    """
    from arithinterp.tasks import Dataset, Example
    from arithinterp.tokenizer import is_char_tokenizer

    if not is_char_tokenizer(tokenizer):
        raise ArithInterpError("task mul4 is written in the built-in character-level format; use a built-in model "
                               "such as icot-mul4.")  # fmt: skip
    k = config.answer_token
    if not 0 <= k < N_OUT:
        raise ArithInterpError(f"answer_token={k} must lie in 0..{N_OUT - 1} (the output digit c_k scored).")
    lo, hi = config.operand_range or (0, 10**DIGITS - 1)
    if hi >= 10**DIGITS:
        raise ArithInterpError(f"operand_range {config.operand_range} exceeds 4 digits; use numbers up to 9999.")
    rng = random.Random(config.seed)
    draws = [(rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi), rng.randint(lo, hi))
             for _ in range(config.n)]  # fmt: skip
    a, b, x, y = (torch.tensor(col) for col in zip(*draws))
    clean, corrupt = encode(a, b)[:, : EQ_POS + 1 + k + 1], encode(x, y)[:, : EQ_POS + 1 + k + 1]
    examples = []
    for ai, bi, xi, yi in draws:
        meta = mul4_meta(ai, bi)
        meta["counterfactual"] = {"a": xi, "b": yi, "result": xi * yi}
        p, t = problem_text(ai, bi)
        q, u = problem_text(xi, yi)
        examples.append(Example(clean=p + t[: 1 + k], corrupted=q + u[: 1 + k], answer=t[1 + k],
                                counterfactual_answer=u[1 + k], full_answer=t[1:], meta=meta))  # fmt: skip
    return Dataset(config=config, style="digits", examples=examples, clean_tokens=clean[:, :-1],
                   corrupted_tokens=corrupt[:, :-1], answer_ids=clean[:, -1],
                   counterfactual_ids=corrupt[:, -1])  # fmt: skip


def run_log(run: str | Path) -> list[dict]:
    """The training log of a mul4 run folder: from its checkpoint while it is unfinished, else from
    `training_log.jsonl` (a finished run or a shipped model folder)."""
    run = Path(run)
    ckpt = run / "checkpoint" / "checkpoint.pt"
    if ckpt.is_file():
        return torch.load(ckpt, weights_only=True, map_location="cpu")["log"]
    if (run / "training_log.jsonl").is_file():
        return [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines() if line.strip()]
    raise ArithInterpError(f"{str(run)!r} holds neither a checkpoint nor training_log.jsonl; pass a run folder or "
                           "a model folder.")  # fmt: skip


def stage_table(log: list[dict]) -> list[dict]:
    """One row per internalization stage reached: the CoT tokens it removed, its first and last logged step, and
    its last evaluation (500 held-out problems in the stage's own format: `exact` = the whole target, `answer` =
    the 8 output digits, `digits`; `val` = validation exact match where stages are adaptive) and whether it ended
    early on reaching `advance_at`."""
    rows: dict[int, dict] = {}
    for e in log:
        row = rows.setdefault(e["stage"], {"stage": e["stage"], "removed": e["removed"], "first_step": e["step"]})
        row["last_step"] = e["step"]
        if "eval_exact_match" in e:
            row |= {"eval_step": e["step"], "exact": e["eval_exact_match"], "answer": e["eval_answer_exact_match"],
                    "digits": e["eval_digit_accuracy"], "val": e.get("val_exact_match")}  # fmt: skip
        row["advanced"] = row.get("advanced", False) or bool(e.get("advanced"))
    return [rows[k] for k in sorted(rows)]


def _init_record(run: Path) -> dict:
    """{"init": <run>/init.json} for a run that started from other weights (`Mul4Schedule.init_from`), else {}."""
    path = Path(run) / "init.json"
    return {"init": json.loads(path.read_text())} if path.is_file() else {}


def run_origin(run: str | Path) -> int:
    """How many steps a run's starting weights had trained for: 0 for a fresh run; for a warm start
    (`Mul4Schedule.init_from`) from a run's checkpoint, that checkpoint's step, and from a finished model folder,
    the last step of its training log; plus the source's own origin where its folder is still there (a model folder
    that is gone counts 0). Puts a warm-started run on the step axis of the run it continues."""
    run = Path(run)
    record = _warm_start(run)
    if record is None:
        return 0
    source = _source_folder(record)
    here = source.is_dir() and source.resolve() != run.resolve()
    if record["kind"] == "run checkpoint":
        return int(record["step"]) + (run_origin(source) if here else 0)
    return (_last_step(source) + run_origin(source)) if here else 0


def _warm_start(run: Path) -> dict | None:
    """The `init.json` record of a warm-started run (read from the model card, `arithinterp.json`, for a finished
    run or a shipped model folder): started from another run's checkpoint (kind "run checkpoint", with its step)
    or from a model folder (kind "local model" / "builtin model", all of that model's training); None for a fresh
    run, or one started from a hub model (trained elsewhere)."""
    record = _init_record(run).get("init")
    if record is None and (run / "arithinterp.json").is_file():
        record = json.loads((run / "arithinterp.json").read_text()).get("init")
    if not record or record.get("kind") not in ("run checkpoint", "local model", "builtin model"):
        return None
    return record


def _source_folder(record: dict) -> Path:
    """Where the source of a warm-start record is: a built-in by its name (this checkout's data/models), a run or
    local model folder by its path as recorded (`run_folder`)."""
    if record["kind"] == "builtin model":
        from arithinterp.models import BUILTIN_DIR

        return BUILTIN_DIR / record["from"]
    return run_folder(record["from"])


def _last_step(folder: Path) -> int:
    """The last step in a run or model folder's training log (0 for an empty log)."""
    log = run_log(folder)
    return int(log[-1]["step"]) if log else 0


def _run_settings(run: Path) -> dict:
    """The settings a run folder was started with: `checkpoint/settings.json` while unfinished, else the model
    card (`arithinterp.json`); {} where neither is there."""
    for path in (run / "checkpoint" / "settings.json", run / "arithinterp.json"):
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def run_lineage(run: str | Path) -> list[dict]:
    """The chain of runs whose training a run's weights carry, oldest first: one link per run, following
    `init.json` (`Mul4Schedule.init_from` a run's checkpoint or a finished model folder) back to a fresh start.

    Each link: `run` (the folder as recorded; a built-in's folder in this checkout), `steps` (how many of that
    run's steps the chain uses: all of the last run's and of a model folder's, and a run's up to the checkpoint step
    taken from it), `time_s` (that run's training time up to there, from its log), `problems` (steps × batch),
    `seed`, `batch_size`, `d_model`, and `removed` (the CoT tokens removed in its first and last stage used). A
    source whose folder is not there gives a link with `steps` only (None for a model folder) and `missing=True`:
    the totals are then lower bounds. Training time of a chain is the sum of its links' `time_s`.
    """
    links: list[dict] = []
    name, upto, seen = str(run), None, set()  # name: the folder as recorded; here: where it is found
    while True:
        here = run_folder(name)
        if here.resolve() in seen:
            raise ArithInterpError(f"the warm starts recorded from {str(run)!r} go round in a loop at {name!r}.")
        seen.add(here.resolve())
        if not here.is_dir():
            links.append({"run": name, "steps": upto, "missing": True})
            break
        log = run_log(here)
        used = [e for e in log if upto is None or e["step"] <= upto]
        cfg = _run_settings(here).get("train_config", {})
        last = used[-1] if used else {"step": 0, "time_s": 0.0}
        steps = last["step"] if upto is None else upto  # the checkpoint taken, which the log may not have hit
        links.append({"run": name, "steps": steps, "time_s": float(last.get("time_s", 0.0)),
                      "problems": steps * cfg.get("batch_size", 0), "seed": cfg.get("seed"),
                      "batch_size": cfg.get("batch_size"), "d_model": cfg.get("d_model"),
                      "removed": (used[0]["removed"], used[-1]["removed"]) if used else None})  # fmt: skip
        record = _warm_start(here)
        if record is None:
            break
        source = _source_folder(record)
        name = str(source) if record["kind"] == "builtin model" else record["from"]
        upto = int(record["step"]) if record["kind"] == "run checkpoint" else None  # a model folder: all its steps
    return links[::-1]


def lineage_logs(run: str | Path) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Every run of `run`'s lineage with its log cut at the step the next run took, and the step it starts from
    on the chain's axis: `plots.internalization_figure(logs, origins=origins)` then draws the whole training of a
    model taken up from other runs as one curve. Missing source folders are left out (their steps still count)."""
    logs, origins, at = {}, {}, 0
    for link in run_lineage(run):
        if not link.get("missing"):
            logs[link["run"]] = [e for e in run_log(run_folder(link["run"])) if e["step"] <= link["steps"]]
            origins[link["run"]] = at
        at += link["steps"] or 0
    return logs, origins


def run_folder(recorded: str | Path) -> Path:
    """Where a run folder named in a record (`init.json`, a card's lineage) is: the path itself, or, for a relative
    path not found from here, the same path under the project root (the committed runs are recorded as
    `data/runs/...`, so a notebook or test run from elsewhere still finds them)."""
    path = Path(recorded)
    if path.exists() or path.is_absolute():
        return path
    in_project = Path(__file__).resolve().parents[1] / path
    return in_project if in_project.exists() else path


def replay_training_problems(run: str | Path, upto: int | None = None) -> Int[Tensor, " m"]:
    """The problems of `run`'s training batches before step `upto` (default: all its steps so far), as sorted
    unique keys a·10⁴ + b, rebuilt by drawing every batch again: the data generator (seeded with the run's seed,
    saved in each checkpoint) is the only source of them. The replay goes on to the run's checkpoint and must end
    in the generator state saved there, else it raises (the run drew its batches some other way); so `run` must
    hold a checkpoint (a finished run has dropped it)."""
    from arithinterp.train import TrainConfig

    run = Path(run)
    ckpt = run / "checkpoint" / "checkpoint.pt"
    if not ckpt.is_file():
        raise ArithInterpError(f"{str(run)!r} holds no checkpoint (checkpoint/checkpoint.pt): the replay checks itself "
                               "against the generator state saved there. Pass an unfinished run's folder.")  # fmt: skip
    settings = json.loads((run / "checkpoint" / "settings.json").read_text())
    cfg, sched = TrainConfig(**settings["train_config"]), Mul4Schedule(**settings["schedule"])
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    last = int(state["step"])
    starts = StageClock.restored(sched, state).starts_at(last)  # first step of each stage begun by the checkpoint
    upto = last if upto is None else upto
    if not 0 <= upto <= last:
        raise ArithInterpError(f"upto={upto}: {str(run)!r} has trained {last} steps; pass 0..{last}.")
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = ProblemSampler(cfg.seed, cfg.n_test, sched.large_digit_share)
    keys = []
    for step in tqdm(range(last), desc=f"replay {run.name}", leave=False, mininterval=5):
        stage = bisect.bisect_right(starts, step) - 1
        a, b, _ = _draw_batch(sched, sched.removals[stage], sampler, cfg.batch_size, gen)
        if step < upto:
            keys.append(a * 10**DIGITS + b)
    if not torch.equal(gen.get_state(), state["gen"]):
        raise ArithInterpError(f"replaying {str(run)!r} to step {last} did not end in the generator state its "
                               "checkpoint saved: its batches were drawn in another way than `training_batch` "
                               "draws them now, and which problems it saw cannot be rebuilt.")  # fmt: skip
    return torch.unique(torch.cat(keys)) if keys else torch.zeros(0, dtype=torch.long)


def seen_by_sources(run: str | Path, a: Tensor, b: Tensor) -> Tensor:
    """Which problems (a, b) a training batch of an earlier run in `run`'s lineage held (`run_lineage`, each
    source up to the checkpoint step taken from it; `replay_training_problems`). A run never draws its own
    held-out problems, but a warm start's sources, with other seeds, did not exclude them: this is the share of a
    held-out set that the weights may have trained on.

    A source whose own held-out set (its seed and n_test) holds every problem asked about never drew any of them,
    so it needs no replay: a lineage of one seed is answered at once, also through finished model folders, which
    keep no checkpoint to replay against. Any other source folder that is not there, or holds no checkpoint,
    raises."""
    links = run_lineage(run)[:-1]
    seen = torch.zeros(len(a), dtype=torch.bool)
    key = a.long() * 10**DIGITS + b.long()
    for link in links:
        if link.get("missing"):
            raise ArithInterpError(f"{link['run']!r}, a source in the lineage of {str(run)!r}, is not there; its "
                                   "training problems cannot be replayed.")  # fmt: skip
        folder = run_folder(link["run"])
        cfg = _run_settings(folder).get("train_config", {})
        if "seed" in cfg and "n_test" in cfg and _in_sorted(ProblemSampler(cfg["seed"], cfg["n_test"]).banned,
                                                            key).all():  # fmt: skip
            continue  # all of them were kept out of that run's batches
        seen |= _in_sorted(replay_training_problems(folder, link["steps"]), key)
    return seen


def held_out_unseen(folder: str | Path) -> dict:
    """A finished multiplication model's held-out result (greedy, its card's seed and n_test), also on the part of
    its held-out problems that no run before it in its lineage drew (`seen_by_sources`): for a model taken up from
    runs with other seeds, the figure that is held out in the strict sense. `folder`: the finished run or model
    folder (its `arithinterp.json` records the warm start)."""
    from transformers import GPT2LMHeadModel

    folder = Path(folder)
    card_path = folder / "arithinterp.json"
    if not card_path.is_file():
        raise ArithInterpError(f"{str(folder)!r} holds no arithinterp.json; pass a finished run or model folder.")
    card = json.loads(card_path.read_text())
    seed, n = card["train_config"]["seed"], card["n_test"]
    a, b = held_out(seed, n)
    seen = seen_by_sources(folder, a, b)
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    unseen = greedy_eval(model, seed, n, problems=(a[~seen], b[~seen]))
    return {"n": n, "seen_by_sources": int(seen.sum()), "all": greedy_eval(model, seed, n), "unseen": unseen}


def record_lineage(folder: str | Path) -> dict:
    """Write into a finished model's card (`arithinterp.json`, atomically) what a model taken up from other runs
    needs there: `lineage` (`run_lineage`: every run its weights carry, with steps, problems, seeds and training
    time) and `held_out_unseen` (`held_out_unseen`: its held-out result also on the problems none of those runs
    drew). Returns the card. For a built-in whose training was a chain of warm starts."""
    folder = Path(folder)
    report = held_out_unseen(folder)  # also checks the card is there
    card = json.loads((folder / "arithinterp.json").read_text())
    if report["all"] != card["held_out"]:
        raise ArithInterpError(f"{str(folder)!r}: the model's held-out result {report['all']} differs from its card's "
                               f"{card['held_out']}; the card does not describe these weights.")  # fmt: skip
    card["lineage"] = json.loads(json.dumps(run_lineage(folder)))  # as the file holds it: tuples become lists
    card["held_out_unseen"] = {"seen_by_sources": report["seen_by_sources"],
                               "n": report["n"] - report["seen_by_sources"], **report["unseen"]}  # fmt: skip
    atomic_write_json(folder / "arithinterp.json", card)
    return card


def checkpoint_model(run: str | Path) -> tuple[Any, Any, StageClock, dict]:
    """The model of an unfinished run's latest checkpoint (eval mode), with its TrainConfig, its stage clock (the
    schedule is `clock.sched`; `clock.stage(state["step"])` the stage it is in) and the checkpoint's state. Under
    `keep_position` the model expects kept position ids: run `format_model(model, clock.sched, removed)` instead."""
    from arithinterp.train import TrainConfig, build_model

    run = Path(run)
    ckpt = run / "checkpoint" / "checkpoint.pt"
    if not ckpt.is_file():
        raise ArithInterpError(f"{str(run)!r} holds no checkpoint (checkpoint/checkpoint.pt); pass a run folder.")
    settings = json.loads((run / "checkpoint" / "settings.json").read_text())
    cfg = TrainConfig(**settings["train_config"])
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    clock = StageClock.restored(Mul4Schedule(**settings["schedule"]), state)
    model = build_model(cfg, N_POSITIONS_MODEL)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, clock, state


def export_checkpoint(run: str | Path, dest: str | Path, *, n_test: int | None = None) -> dict:
    """Ship an unfinished run: write the checkpoint in `run` as a model folder `dest` (HF weights, tokenizer,
    `training_log.jsonl`, `arithinterp.json` with `"finished": false`, the step and stage reached, and held-out
    accuracy in the no-cot format). The run itself is untouched and resumes as before."""
    from arithinterp.train import _write_model_folder, write_log

    run, dest = Path(run), Path(dest)
    model, cfg, clock, state = checkpoint_model(run)
    sched = clock.sched
    model = format_model(model, sched, COT_LEN)  # the no-cot format, positions baked in under keep_position
    dest.mkdir(parents=True, exist_ok=True)
    held = greedy_eval(model, cfg.seed, n_test or cfg.n_test)
    stage = clock.stage(state["step"])
    _write_model_folder(dest, model)
    if state.get("aux"):
        from safetensors.torch import save

        atomic_write_bytes(dest / "aux_heads.safetensors", save(state["aux"]))  # atomic, like train_mul4's
    write_log(dest, state["log"])
    summary = {
        "name": dest.name, "description": TASK_DESCRIPTIONS[cfg.task], "task": cfg.task, "finished": False,
        "step": state["step"], "steps": cfg.steps, "stage": stage, "stages": len(sched.removals),
        "cot_tokens_removed": sched.removals[stage], "train_config": asdict(cfg), "schedule": asdict(sched),
        "held_out": held, "n_test": n_test or cfg.n_test, "train_time_s": round(state["elapsed"], 1),
        **_init_record(run), "resume": f"arithinterp train --resume {run}",
        "format": "<bos>a0a1a2a3*b0b1b2b3$=c0c1c2c3c4c5c6c7<eos> (all numbers least significant digit first)",
    }  # fmt: skip
    atomic_write_json(dest / "arithinterp.json", summary)
    return summary
