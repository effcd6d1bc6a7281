"""Arithmetic tasks: prompts, answers, counterfactual prompts and per-example metadata.

A task turns `(tokenizer, TaskConfig)` into a `Dataset`: clean prompts, counterfactual ("corrupted") prompts
of the same token length, the answer token that is scored, the counterfactual answer token, and metadata
(operands, their digits, carries, the result) that probes and analyses read.

Scoring is explicit. With a tokenizer in which the answer is one token (GPT-2 and its number tokens
' 0'..' 999') the answer token is the answer. With a tokenizer that splits numbers into digits (the built-in
models, LLaMA) the answer is several tokens; `answer_token` (0 = first emitted) chooses which one is scored and
the prompt is extended by the answer tokens before it (teacher forcing). `answers="single-token"` refuses
multi-token answers instead of scoring one of their tokens. Nothing is scored on a token it does not own.

Digit-level format of the built-in models (`style="digits"`): operands written most significant digit first
and zero-padded, the result written *least* significant digit first, zero-padded to `digits + 1` places::

    "123+459=" -> "2850"   (582 reversed, padded)

so the first answer token is the units digit, which depends on the operands' units digits only.

Datasets are deterministic given the seed, and round-trip through JSONL.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from arithinterp._errors import ArithInterpError
from arithinterp._io import atomic_write_text
from arithinterp.tokenizer import is_char_tokenizer

OPS: dict[str, dict[str, Any]] = {
    "add": {"symbol": "+", "noun": "sum", "verb": "plus", "fn": lambda a, b: a + b},
    "sub": {"symbol": "-", "noun": "difference", "verb": "minus", "fn": lambda a, b: a - b},
    "mul": {"symbol": "*", "noun": "product", "verb": "times", "fn": lambda a, b: a * b},
    "div": {"symbol": "/", "noun": "quotient", "verb": "divided by", "fn": lambda a, b: a // b},
}
STYLES = ("digits", "equation", "statement", "question")
COUNTERFACTUALS = ("operand", "null-operator", "random", "same-result")
GREATER_THAN_NOUNS = (
    "war", "siege", "dynasty", "reign", "expedition", "occupation", "pilgrimage", "campaign", "journey",
    "voyage", "famine", "drought", "strike", "crusade", "rebellion", "truce", "alliance", "embargo",
)  # fmt: skip
TASKS = ("add", "sub", "mul", "div", "greater-than", "mul4")  # mul4: 4x4 multiplication, arithinterp.mul4

Style = Literal["digits", "equation", "statement", "question"]
Counterfactual = Literal["operand", "null-operator", "random", "same-result"]


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What to generate. Every field has a default that works for the built-in addition model."""

    task: str = "add"  # one of TASKS
    n: int = 200  # number of examples
    seed: int = 0  # datasets are a pure function of (config, tokenizer)
    style: Style | None = None  # None: "digits" for the built-in char tokenizer, else "equation"
    counterfactual: Counterfactual = "operand"
    digits: int = 3  # digit style: operands have exactly this many digits (zero-padded)
    operand_range: tuple[int, int] | None = None  # inclusive; None: 0..10**digits-1 (digits), 1..99 (words)
    answer_token: int = 0  # which answer token is scored (0 = the first one the model emits)
    answers: Literal["single-token", "by-token"] = "by-token"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ArithInterpError(f"unknown task {self.task!r}; choose one of: {', '.join(TASKS)}.")
        if self.n < 1:
            raise ArithInterpError(f"n={self.n} gives an empty dataset; pass n >= 1 (e.g. --n 100).")
        if self.style is not None and self.style not in STYLES:
            raise ArithInterpError(f"unknown style {self.style!r}; choose one of: {', '.join(STYLES)}.")
        if self.counterfactual not in COUNTERFACTUALS:
            raise ArithInterpError(
                f"unknown counterfactual {self.counterfactual!r}; choose one of: {', '.join(COUNTERFACTUALS)}."
            )
        if not 1 <= self.digits <= 12:
            raise ArithInterpError(f"digits={self.digits} is out of range; pass 1..12.")
        if self.answer_token < 0:
            raise ArithInterpError(f"answer_token={self.answer_token} must be >= 0 (0 = first answer token).")
        if self.operand_range is not None:
            lo, hi = self.operand_range
            if lo < 0 or hi < lo:
                raise ArithInterpError(f"operand_range={self.operand_range} must be (lo, hi) with 0 <= lo <= hi.")


@dataclass(frozen=True, kw_only=True)
class Example:
    """One clean/counterfactual pair. `answer` is the scored token's text; `full_answer` the whole answer."""

    clean: str
    corrupted: str
    answer: str
    counterfactual_answer: str | None
    full_answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """Examples plus their tokens. All prompts share one token length, so positions line up.

    `token_set` / `positive` describe set-valued scoring (greater-than: the 100 two-digit year tokens and,
    per example, which of them are correct); they are None for tasks scored on one answer token.
    """

    config: TaskConfig
    style: str
    examples: list[Example]
    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answer_ids: Int[Tensor, " batch"]
    counterfactual_ids: Int[Tensor, " batch"]  # -1 where a counterfactual has no answer
    token_set: Int[Tensor, " set"] | None = None
    positive: torch.BoolTensor | None = None  # [batch, set]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_counterfactual_answer(self) -> bool:
        return bool((self.counterfactual_ids >= 0).all())

    def subset(self, index: list[int] | Tensor) -> "Dataset":
        idx = torch.as_tensor(index, dtype=torch.long)
        if idx.numel() == 0:
            raise ArithInterpError("no examples left after filtering; use more examples (--n) or drop the filter.")
        return replace(
            self,
            examples=[self.examples[i] for i in idx.tolist()],
            clean_tokens=self.clean_tokens[idx],
            corrupted_tokens=self.corrupted_tokens[idx],
            answer_ids=self.answer_ids[idx],
            counterfactual_ids=self.counterfactual_ids[idx],
            positive=None if self.positive is None else self.positive[idx],
        )

    def fingerprint(self) -> str:
        """A short hash of the examples (prompts, answers, metadata): equal datasets, equal fingerprints."""
        h = hashlib.sha256()
        names = [f.name for f in fields(Example)]
        for ex in self.examples:  # == json.dumps(asdict(ex)) without asdict's deep copy (10x faster)
            h.update(json.dumps({k: getattr(ex, k) for k in names}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def records(self) -> list[dict[str, Any]]:
        """The examples as the JSON records of the CLI contract."""
        return [
            {"clean": e.clean, "corrupted": e.corrupted, "answer": e.answer,
             "counterfactual_answer": e.counterfactual_answer}
            for e in self.examples
        ]  # fmt: skip

    def save_jsonl(self, path: str | Path) -> Path:
        """Write config, style and examples to JSONL (first line: header); atomic."""
        lines = [json.dumps({"arithinterp_dataset": 1, "config": asdict(self.config), "style": self.style})]
        lines += [json.dumps(asdict(e)) for e in self.examples]
        return atomic_write_text(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Building datasets


def default_style(tokenizer) -> str:
    return "digits" if is_char_tokenizer(tokenizer) else "equation"


def make_dataset(tokenizer, config: TaskConfig | None = None, **overrides: Any) -> Dataset:
    """Generate a dataset for `config` (or `TaskConfig(**overrides)`) tokenised with `tokenizer`."""
    config = replace(config, **overrides) if config is not None else TaskConfig(**overrides)
    style = config.style or default_style(tokenizer)
    if style == "digits" and not is_char_tokenizer(tokenizer):
        raise ArithInterpError(
            "style 'digits' is the format of the built-in character-level models; "
            "use style equation, statement or question with this tokenizer."
        )
    if config.task == "greater-than":
        return _make_greater_than(tokenizer, config)
    if config.task == "mul4":  # 4x4 multiplication in the format of the icot/sft/aux-mul4 models
        from arithinterp.mul4 import mul4_dataset

        return mul4_dataset(tokenizer, config)
    return _make_arithmetic(tokenizer, config, style)


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(ids)


def _operand_range(config: TaskConfig, style: str) -> tuple[int, int]:
    if config.operand_range is not None:
        lo, hi = config.operand_range
        if style == "digits" and hi >= 10**config.digits:
            raise ArithInterpError(
                f"operand_range {config.operand_range} has numbers with more than digits={config.digits} "
                f"digits; pass --digits {len(str(hi))} or a smaller range."
            )
        return lo, hi
    return (0, 10**config.digits - 1) if style == "digits" else (1, 99)


def _draw_operands(rng: random.Random, task: str, lo: int, hi: int) -> tuple[int, int]:
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if task == "sub" and b > a:
        a, b = b, a  # results stay non-negative
    if task == "div":
        b = max(b, 1)
        if b > hi:
            raise ArithInterpError("div needs a divisor >= 1; raise the top of --range.")
    return a, b


def _digits_lsb(x: int, width: int) -> list[int]:
    return [(x // 10**i) % 10 for i in range(width)]


def operand_metadata(op: str, a: int, b: int, width: int) -> dict[str, Any]:
    """Operands, their digits (index i = the 10**i place), carries or borrows, and the result.

    For add, `carries[i]` is the carry *out of* place i; for sub, `borrows[i]` the borrow out of place i.
    """
    result = OPS[op]["fn"](a, b)
    meta: dict[str, Any] = {
        "op": op, "a": a, "b": b, "result": result,
        "a_digits": _digits_lsb(a, width), "b_digits": _digits_lsb(b, width),
        "result_digits": _digits_lsb(result, width + 1 if op != "mul" else 2 * width),
    }  # fmt: skip
    if op == "add":
        carry, carries = 0, []
        for da, db in zip(meta["a_digits"], meta["b_digits"]):
            carry = (da + db + carry) // 10
            carries.append(carry)
        meta["carries"] = carries
    elif op == "sub":
        borrow, borrows = 0, []
        for da, db in zip(meta["a_digits"], meta["b_digits"]):
            borrow = 1 if da - db - borrow < 0 else 0
            borrows.append(borrow)
        meta["borrows"] = borrows
    return meta


def _render(style: str, op: str, a: int, b: int, width: int, *, null: str | None = None) -> tuple[str, str]:
    """(prompt, full answer text) for one problem; `null` replaces the operator word/symbol."""
    spec = OPS[op]
    result = spec["fn"](a, b)
    if style == "digits":
        sym = null if null is not None else spec["symbol"]
        out_width = width + 1 if op in ("add", "sub") else 2 * width
        rev = "".join(str(d) for d in _digits_lsb(result, out_width))
        return f"{a:0{width}d}{sym}{b:0{width}d}=", rev
    if style == "equation":
        sym = null if null is not None else spec["symbol"]
        return f"{a} {sym} {b} =", f" {result}"
    if style == "statement":
        noun = null if null is not None else spec["noun"]
        return f"The {noun} of {a} and {b} is", f" {result}"
    verb = null if null is not None else spec["verb"]
    return f"Q: What is {a} {verb} {b}? A:", f" {result}"


_NULL_WORDS = {"digits": "|", "equation": "&", "statement": "word", "question": "and"}


def _answer_token_ids(tokenizer, prompt: str, full_answer: str) -> list[int]:
    """The tokens of `full_answer` as the model would emit them after `prompt`."""
    p = tokenizer.encode(prompt, add_special_tokens=False)
    pa = tokenizer.encode(prompt + full_answer, add_special_tokens=False)
    if pa[: len(p)] != p:  # the answer merged with the prompt's last token
        return tokenizer.encode(full_answer, add_special_tokens=False)
    return pa[len(p) :]


class _Builder:
    """Accumulates examples of one token length; rejects candidates that would mis-score."""

    def __init__(self, tokenizer, config: TaskConfig):
        self.tok, self.config = tokenizer, config
        self.examples: list[Example] = []
        self.rows: list[tuple[list[int], list[int], int, int]] = []
        self.length: int | None = None
        self.rejected: dict[str, int] = {}

    def reject(self, why: str) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1

    def scored(self, prompt: str, full_answer: str) -> tuple[str, int, str] | None:
        """(teacher-forced prompt, scored token id, its text), or None if the answer cannot be scored."""
        ids = _answer_token_ids(self.tok, prompt, full_answer)
        k = self.config.answer_token
        if self.config.answers == "single-token" and len(ids) != 1:
            self.reject("answer is not a single token")
            return None
        if k >= len(ids):
            self.reject(f"answer has fewer than {k + 1} tokens")
            return None
        prefix = self.tok.decode(ids[:k]) if k else ""
        return prompt + prefix, ids[k], self.tok.decode([ids[k]])

    def add(self, ex: Example, answer_id: int, cf_id: int) -> bool:
        clean, corrupted = _encode(self.tok, ex.clean), _encode(self.tok, ex.corrupted)
        if len(clean) != len(corrupted):
            self.reject("clean and counterfactual prompts differ in token length")
            return False
        if self.length is None:
            self.length = len(clean)
        if len(clean) != self.length:
            self.reject("prompt token length differs from the dataset's")
            return False
        self.examples.append(ex)
        self.rows.append((clean, corrupted, answer_id, cf_id))
        return True

    def finish(self, style: str, **extra: Any) -> Dataset:
        if len(self.examples) < self.config.n:
            reasons = "; ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items(), key=lambda kv: -kv[1]))
            raise ArithInterpError(
                f"could only build {len(self.examples)} of n={self.config.n} {self.config.task} examples "
                f"(rejected: {reasons or 'none'}); widen --range, pick another --style, or pass "
                "--answers by-token to score multi-token answers one token at a time."
            )
        return Dataset(
            config=self.config,
            style=style,
            examples=self.examples,
            clean_tokens=torch.tensor([r[0] for r in self.rows], dtype=torch.long),
            corrupted_tokens=torch.tensor([r[1] for r in self.rows], dtype=torch.long),
            answer_ids=torch.tensor([r[2] for r in self.rows], dtype=torch.long),
            counterfactual_ids=torch.tensor([r[3] for r in self.rows], dtype=torch.long),
            **extra,
        )


def _same_result_operands(rng: random.Random, op: str, x: int, y: int) -> tuple[int, int]:
    """Other operands with the same result (the same-result control)."""
    d = rng.choice([d for d in range(-9, 10) if d])
    if op == "add":
        return x + d, y - d
    if op == "sub":
        return x + d, y + d
    if op == "mul":
        return y, x
    return x + d, y  # div: accepted only if the quotient is unchanged


def _find_counterfactual(b, rng, config, style, xy, bounds, width, ans_id):
    """Operands for the counterfactual prompt: ((a', b'), (prompt, scored id, scored text)) or None.

    "operand": new operands whose scored answer token differs from the clean one, so logit difference is
    defined. "same-result": different operands with the same result (a control: patching should do nothing).
    """
    op, (x, y), (lo, hi) = config.task, xy, bounds
    target = OPS[op]["fn"](x, y)
    for _ in range(200):
        if config.counterfactual == "same-result":
            x2, y2 = _same_result_operands(rng, op, x, y)
        else:
            x2, y2 = _draw_operands(rng, op, lo, hi)
        if (x2, y2) == (x, y) or not (lo <= x2 <= hi and lo <= y2 <= hi) or (op == "div" and y2 < 1):
            continue
        if config.counterfactual == "same-result" and OPS[op]["fn"](x2, y2) != target:
            continue
        p2, f2 = _render(style, op, x2, y2, width)
        got = b.scored(p2, f2)
        if got is None:
            continue
        if config.counterfactual == "same-result" or got[1] != ans_id:
            return (x2, y2), got
    return None


def _null_operator_prompt(tokenizer, style, op, x, y, width, prompt, clean) -> str | None:
    """The clean prompt with its operator replaced by a null word, repeated to keep the token length."""
    n = len(_encode(tokenizer, clean))
    word = _NULL_WORDS[style]
    for reps in (1, 2, 3):
        null = word if style == "digits" else " ".join([word] * reps)
        null_prompt, _ = _render(style, op, x, y, width, null=null)
        candidate = null_prompt + clean[len(prompt) :]
        if len(_encode(tokenizer, candidate)) == n:
            return candidate
    return None


def _random_prompt(tokenizer, rng: random.Random, clean: str) -> str | None:
    """Random tokens (from the clean prompt's and the digits' tokens) that re-tokenise to the same length."""
    ids = tokenizer.encode(clean, add_special_tokens=False)
    pool = sorted(set(ids) | {t for d in "0123456789" for t in tokenizer.encode(d, add_special_tokens=False)})
    for _ in range(100):
        text = tokenizer.decode([rng.choice(pool) for _ in ids])
        if len(tokenizer.encode(text, add_special_tokens=False)) == len(ids) and text != clean:
            return text
    return None


def _make_arithmetic(tokenizer, config: TaskConfig, style: str) -> Dataset:
    rng = random.Random(f"{config.task}:{config.seed}")
    lo, hi = _operand_range(config, style)
    width = config.digits if style == "digits" else max(len(str(hi)), 1)
    op = config.task
    b = _Builder(tokenizer, config)
    for _attempt in range(50 * config.n + 1000):
        if len(b.examples) >= config.n:
            break
        x, y = _draw_operands(rng, op, lo, hi)
        prompt, full = _render(style, op, x, y, width)
        got = b.scored(prompt, full)
        if got is None:
            continue
        clean, ans_id, ans = got
        meta = operand_metadata(op, x, y, width)
        meta["answer_token"] = config.answer_token
        cf_id, cf_ans = -1, None
        kind = config.counterfactual
        if kind in ("operand", "same-result"):
            found = _find_counterfactual(b, rng, config, style, (x, y), (lo, hi), width, ans_id)
            if found is None:
                b.reject(f"no {kind} counterfactual found")
                continue
            (x2, y2), (corrupted, cf_id, cf_ans) = found
            meta["counterfactual"] = {"a": x2, "b": y2, "result": OPS[op]["fn"](x2, y2)}
        elif kind == "null-operator":
            corrupted = _null_operator_prompt(tokenizer, style, op, x, y, width, prompt, clean)
            if corrupted is None:
                b.reject("no null operator of the operator's token length")
                continue
        else:  # random: tokens drawn from the clean prompt's and the digits' tokens, same token length
            corrupted = _random_prompt(tokenizer, rng, clean)
            if corrupted is None:
                b.reject("no random prompt that re-tokenises to the same length")
                continue
        ex = Example(clean=clean, corrupted=corrupted, answer=ans, counterfactual_answer=cf_ans,
                     full_answer=full, meta=meta)  # fmt: skip
        b.add(ex, ans_id, cf_id)
    return b.finish(style)


def year_tokens(tokenizer) -> list[int]:
    """Ids of the 100 two-digit tokens "00".."99" (greater-than scoring); error if any is not one token."""
    ids = []
    for yy in range(100):
        t = tokenizer.encode(f"{yy:02d}", add_special_tokens=False)
        if len(t) != 1:
            raise ArithInterpError(
                f"greater-than needs every two-digit year ending as one token, but {yy:02d!s} is {len(t)} "
                "tokens under this tokenizer; use a GPT-2-style tokenizer (e.g. --model gpt2)."
            )
        ids.append(t[0])
    return ids


def _make_greater_than(tokenizer, config: TaskConfig) -> Dataset:
    """Hanna et al. (2023): "The <noun> lasted from the year XXYY to the year XX" -> a YY' > YY."""
    if is_char_tokenizer(tokenizer):
        raise ArithInterpError(
            "greater-than is scored over two-digit year tokens; the built-in character-level models have "
            "none. Use a GPT-2-style model (e.g. --model gpt2 or a local GPT-2 folder)."
        )
    ys = year_tokens(tokenizer)
    rng = random.Random(f"greater-than:{config.seed}")
    b = _Builder(tokenizer, config)
    positives = []
    for _attempt in range(50 * config.n + 1000):
        if len(b.examples) >= config.n:
            break
        century, yy = rng.randint(11, 17), rng.randint(2, 98)
        noun = rng.choice(GREATER_THAN_NOUNS)
        clean = f"The {noun} lasted from the year {century}{yy:02d} to the year {century}"
        corrupted = f"The {noun} lasted from the year {century}01 to the year {century}"
        # the start year must split as " XX" + "YY" for the year tokens to be the answers
        if tokenizer.encode(f" {century}{yy:02d}", add_special_tokens=False) != tokenizer.encode(
            f" {century}", add_special_tokens=False
        ) + [ys[yy]]:
            b.reject("start year does not split into century and two-digit tokens")
            continue
        meta = {"century": century, "start_yy": yy, "noun": noun}
        ex = Example(clean=clean, corrupted=corrupted, answer=f"{yy + 1:02d}", counterfactual_answer="01",
                     full_answer=f"{yy + 1:02d}", meta=meta)  # fmt: skip
        if b.add(ex, ys[yy + 1], ys[1]):
            positives.append([y > yy for y in range(100)])
    return b.finish(
        "statement",
        token_set=torch.tensor(ys, dtype=torch.long),
        positive=torch.tensor(positives, dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------------------------
# Persistence and filters


def load_jsonl(path: str | Path, tokenizer) -> Dataset:
    """Load a dataset written by `Dataset.save_jsonl` and re-tokenise it with `tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise ArithInterpError(f"dataset file {str(path)!r} does not exist; write one with Dataset.save_jsonl().")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        header = json.loads(lines[0])
        if "arithinterp_dataset" not in header:
            raise ValueError("missing header")
        cfg = header["config"]
        if cfg.get("operand_range") is not None:
            cfg["operand_range"] = tuple(cfg["operand_range"])
        config = TaskConfig(**{**cfg, "n": max(len(lines) - 1, 1)})
        examples = [Example(**json.loads(ln)) for ln in lines[1:]]
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ArithInterpError(
            f"{str(path)!r} is not an arithinterp dataset JSONL ({exc}); create one with Dataset.save_jsonl()."
        ) from exc
    if not examples:
        raise ArithInterpError(f"dataset file {str(path)!r} has no examples; regenerate it with n >= 1.")
    b = _Builder(tokenizer, config)
    positives = []
    ys = year_tokens(tokenizer) if config.task == "greater-than" else None
    for ex in examples:
        ans = tokenizer.encode(ex.answer, add_special_tokens=False)
        cf = tokenizer.encode(ex.counterfactual_answer, add_special_tokens=False) if ex.counterfactual_answer else [-1]
        if len(ans) != 1 or len(cf) != 1:
            raise ArithInterpError(
                f"answer {ex.answer!r} in {str(path)!r} is not one token under this tokenizer; "
                "load the dataset with the tokenizer it was made for."
            )
        if not b.add(ex, ans[0], cf[0]):
            raise ArithInterpError(f"example {ex.clean!r} in {str(path)!r} does not match the others' token length.")
        if ys is not None:
            positives.append([y > ex.meta["start_yy"] for y in range(100)])
    extra = {}
    if ys is not None:
        extra = {"token_set": torch.tensor(ys), "positive": torch.tensor(positives, dtype=torch.bool)}
    return b.finish(header.get("style", "equation"), **extra)


@torch.no_grad()
def answer_correct(logits: Float[Tensor, "... batch d_vocab"], dataset: Dataset,
                   rows: slice = slice(None)) -> Bool[Tensor, "... batch"]:  # fmt: skip
    """Whether each greedy answer is right, from final-position logits of the examples `rows` of `dataset` (any
    leading axes, e.g. one per ablation): the argmax is the answer token; greater-than: the argmax year > YY."""
    if dataset.token_set is not None:
        pick = logits[..., dataset.token_set].argmax(-1)  # (..., batch)
        positive = dataset.positive[rows]
        return positive.expand(*pick.shape[:-1], *positive.shape).gather(-1, pick[..., None])[..., 0]
    return logits.argmax(-1) == dataset.answer_ids[rows]


def correct_mask(model, dataset: Dataset, batch_size: int = 256) -> torch.BoolTensor:
    """Which clean prompts the model answers correctly (greedy answer token; greater-than: argmax year > YY)."""
    out = []
    for i in range(0, len(dataset), batch_size):
        rows = slice(i, i + batch_size)
        out.append(answer_correct(model(dataset.clean_tokens[rows])[:, -1], dataset, rows))
    return torch.cat(out)


def filter_correct(model, dataset: Dataset) -> Dataset:
    """Keep only the examples the model answers correctly on the clean prompt."""
    keep = correct_mask(model, dataset).nonzero()[:, 0]
    if keep.numel() == 0:
        raise ArithInterpError(
            "the model answers none of the clean prompts correctly; check the model and task, or drop --only-correct."
        )
    return dataset.subset(keep)


TaskFactory = Callable[..., Dataset]
