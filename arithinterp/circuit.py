"""A circuit: the heads and MLPs chosen from per-component scores, how they were chosen, and `circuit.json`.

`Selection` says how to choose (top k, a score threshold, or the smallest set reaching a faithfulness target,
which `arithinterp.localize` measures); `Circuit` is the result, written to and read from `circuit.json`
(schema version 1) with every malformed field named in the error. Scores come from anything that gives one
number per component (`ScoreLike`); `rank` orders them by |score|.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arithinterp._errors import ArithInterpError, check_choice
from arithinterp._io import atomic_write_json
from arithinterp.patching import Component

SCHEMA_VERSION = 1
SELECT_HOW = ("top-k", "threshold", "faithfulness")
DIRECTIONS = ("abs", "above", "below")

#: Anything that gives one score per component: a `PatchResult` (or any object with `.components` and
#: `.scores`), a mapping name-or-Component -> score, or a sequence of (name-or-Component, score) pairs.
ScoreLike = Any


# ---------------------------------------------------------------------------------------------------------
# Scores and components


def as_scores(scores: ScoreLike) -> dict[Component, float]:
    """Normalise any per-component score vector to `{Component: score}` (see `ScoreLike`)."""
    if hasattr(scores, "nodes") and not hasattr(scores, "scores"):  # an attribution result: its node estimates
        scores = scores.nodes
    if hasattr(scores, "components") and hasattr(scores, "scores"):
        pairs = zip(scores.components, [float(s) for s in scores.scores])
    elif isinstance(scores, Mapping):
        pairs = scores.items()
    else:
        try:
            pairs = [(c, s) for c, s in scores]
        except (TypeError, ValueError) as exc:
            raise ArithInterpError(
                f"cannot read component scores from a {type(scores).__name__}; pass a PatchResult, a dict "
                "name -> score, or a list of (name, score) pairs."
            ) from exc
    out: dict[Component, float] = {}
    for c, s in pairs:
        comp = c if isinstance(c, Component) else Component.parse(str(c))
        value = float(s)
        if not math.isfinite(value):
            raise ArithInterpError(f"component {comp.name} has score {value}; scores must be finite numbers.")
        if comp in out:
            raise ArithInterpError(f"component {comp.name} is scored twice; pass one score per component.")
        out[comp] = value
    if not out:
        raise ArithInterpError("the score vector is empty; score at least one component.")
    return out


def rank(scores: Mapping[Component, float]) -> list[Component]:
    """Components by |score|, largest first; ties in model order (layer, then heads before the MLP)."""
    order = {c: i for i, c in enumerate(sorted(scores, key=_model_order))}
    return sorted(scores, key=lambda c: (-abs(scores[c]), order[c]))


def _model_order(c: Component) -> tuple[int, int]:
    return (c.layer, c.head if c.kind == "head" else 10**9)


def as_components(x: Circuit | Iterable[Component | str]) -> list[Component]:
    """The components of a circuit, or of a list of components and names such as "L0H1" and "MLP2"."""
    if isinstance(x, Circuit):
        return list(x.components)
    return [c if isinstance(c, Component) else Component.parse(str(c)) for c in x]


def jaccard(a: Circuit | Iterable[Component | str], b: Circuit | Iterable[Component | str]) -> float:
    """|A ∩ B| / |A ∪ B| of two component sets (1.0 for two empty sets)."""
    sa, sb = set(as_components(a)), set(as_components(b))
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


# ---------------------------------------------------------------------------------------------------------
# Selection and the Circuit


@dataclass(frozen=True, kw_only=True)
class Selection:
    """How components are chosen from a ranking (by |score|). Build with the class methods.

    * `top_k(k)`: the k highest-|score| components.
    * `by_threshold(t, direction)`: every component with |score| >= t ("abs"), score >= t ("above") or
      score <= t ("below", e.g. knockout scores: -0.05 = a drop worse than 5%).
    * `by_faithfulness(target, max_k)`: the smallest top-ranked set whose faithfulness reaches `target`
      (trying sizes 1..max_k; None = every scored component). If none does, the most faithful size is kept
      and `target_reached` is false in the circuit's `select`.
    """

    how: str
    k: int | None = None
    threshold: float | None = None
    direction: str = "abs"
    target: float | None = None
    max_k: int | None = None

    def __post_init__(self) -> None:
        check_choice("selection", self.how, SELECT_HOW)
        check_choice("threshold direction", self.direction, DIRECTIONS)
        if self.how == "top-k" and (self.k is None or self.k < 1):
            raise ArithInterpError(f"top-k selection needs k >= 1 (got {self.k}); pass e.g. --k 5.")
        if self.how == "threshold" and (self.threshold is None or not math.isfinite(self.threshold)):
            raise ArithInterpError(
                f"threshold selection needs a finite threshold (got {self.threshold}); pass e.g. --threshold 0.05."
            )
        if self.how == "faithfulness":
            if self.target is None or not 0 < self.target <= 1:
                raise ArithInterpError(
                    f"faithfulness selection needs a target in (0, 1] (got {self.target}); pass e.g. --target 0.9."
                )
            if self.max_k is not None and self.max_k < 1:
                raise ArithInterpError(f"max_k={self.max_k}: pass max_k >= 1, or None to try every size.")

    @classmethod
    def top_k(cls, k: int) -> Selection:
        return cls(how="top-k", k=k)

    @classmethod
    def by_threshold(cls, threshold: float, direction: str = "abs") -> Selection:
        return cls(how="threshold", threshold=threshold, direction=direction)

    @classmethod
    def by_faithfulness(cls, target: float = 0.9, max_k: int | None = None) -> Selection:
        return cls(how="faithfulness", target=target, max_k=max_k)

    def params(self) -> dict[str, Any]:
        """The JSON `select` record: `how` plus the parameters it uses."""
        if self.how == "top-k":
            return {"how": self.how, "k": self.k}
        if self.how == "threshold":
            return {"how": self.how, "threshold": self.threshold, "direction": self.direction}
        return {"how": self.how, "target": self.target, "max_k": self.max_k}


def select_components(scores: ScoreLike, selection: Selection) -> list[Component]:
    """Top-k or threshold selection (faithfulness selection needs a model: use `localize`)."""
    s = as_scores(scores)
    ranked = rank(s)
    if selection.how == "top-k":
        return ranked[: selection.k]
    if selection.how == "threshold":
        t = selection.threshold
        keep = {"abs": lambda v: abs(v) >= t, "above": lambda v: v >= t, "below": lambda v: v <= t}[selection.direction]
        return [c for c in ranked if keep(s[c])]
    raise ArithInterpError("faithfulness selection runs the model; call localize(scores, model=..., dataset=...).")


_SCHEMA_KEYS = ("version", "model", "task", "method", "metric", "select", "components", "faithfulness",
                "n_total_components")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Circuit:
    """A set of heads and MLPs with their scores, how they were chosen, and for which model and task.

    `components` are the chosen ones, ranked; `scores` holds every scored component's score (the ranking).
    `faithfulness` is the circuit's faithfulness score (None if not measured); `info` carries everything
    else written to circuit.json (reproduction fields, faithfulness details, curve, necessity, transfer).
    """

    model: str
    task: str
    method: str
    metric: str
    select: dict[str, Any]
    components: tuple[Component, ...]
    scores: dict[str, float]
    n_total_components: int
    faithfulness: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.components)

    def __contains__(self, item: Component | str) -> bool:
        return (item if isinstance(item, Component) else Component.parse(str(item))) in self.components

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    @property
    def heads(self) -> list[Component]:
        return [c for c in self.components if c.kind == "head"]

    @property
    def mlps(self) -> list[Component]:
        return [c for c in self.components if c.kind == "mlp"]

    @property
    def fraction(self) -> float:
        """The circuit's size as a fraction of all heads and MLPs."""
        return len(self.components) / self.n_total_components

    def _record(self, c: Component) -> dict[str, Any]:
        return {"name": c.name, "kind": c.kind, "layer": c.layer, "head": c.head, "score": self.scores.get(c.name)}

    def to_dict(self) -> dict[str, Any]:
        """The circuit.json record (schema version 1)."""
        ranking = rank({Component.parse(n): v for n, v in self.scores.items()}) if self.scores else []
        head = {
            "version": SCHEMA_VERSION, "model": self.model, "task": self.task, "method": self.method,
            "metric": self.metric, "select": self.select, "components": [self._record(c) for c in self.components],
            "faithfulness": self.faithfulness, "n_total_components": self.n_total_components,
            "fraction": self.fraction, "ranking": [self._record(c) for c in ranking],
        }  # fmt: skip
        return head | {k: v for k, v in self.info.items() if k not in head}

    def save(self, path: str | Path) -> Path:
        """Write circuit.json (atomically)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        """Read circuit.json; a malformed file raises `ArithInterpError` saying what is wrong and where."""
        path = Path(path)
        where = f"circuit file {str(path)!r}"
        if not path.is_file():
            raise ArithInterpError(f"{where} does not exist; create one with `arithinterp localize --out DIR`.")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArithInterpError(
                f"{where} is not valid JSON ({exc}); regenerate it with `arithinterp localize`."
            ) from exc
        return cls.from_dict(data, where=where)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "circuit record") -> Circuit:
        """Validate and build a circuit from its JSON record."""

        def bad(what: str) -> ArithInterpError:
            return ArithInterpError(f"{where} is malformed: {what}; regenerate it with `arithinterp localize`.")

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, found {type(data).__name__}")
        if data.get("version") != SCHEMA_VERSION:
            raise ArithInterpError(
                f"{where} has schema version {data.get('version')!r}, but this arithinterp reads version "
                f"{SCHEMA_VERSION}; regenerate it with this version's `arithinterp localize`."
            )
        missing = [k for k in _SCHEMA_KEYS if k not in data]
        if missing:
            raise bad(f"missing key(s) {', '.join(missing)}")
        for key in ("model", "task", "method", "metric"):
            if not isinstance(data[key], str):
                raise bad(f"{key!r} must be a string, found {data[key]!r}")
        sel = data["select"]
        if not isinstance(sel, dict) or sel.get("how") not in SELECT_HOW:
            raise bad(f"'select' must be an object with 'how' one of {', '.join(SELECT_HOW)}, found {sel!r}")
        if not isinstance(data["components"], list):
            raise bad("'components' must be a list of component records")
        comps = [cls._parse_component(rec, i, bad) for i, rec in enumerate(data["components"])]
        names = [c.name for c, _ in comps]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise bad(f"component(s) {', '.join(dup)} listed twice")
        n_total = data["n_total_components"]
        if not isinstance(n_total, int) or isinstance(n_total, bool) or n_total < max(len(comps), 1):
            raise bad(f"'n_total_components' must be an integer >= the number of components, found {n_total!r}")
        faith = data["faithfulness"]
        if faith is not None and (isinstance(faith, bool) or not isinstance(faith, (int, float))):
            raise bad(f"'faithfulness' must be a number or null, found {faith!r}")
        scores = {c.name: s for c, s in comps if s is not None}
        ranking = data.get("ranking", [])
        if isinstance(ranking, list):
            for i, rec in enumerate(ranking):
                c, s = cls._parse_component(rec, i, bad, field_name="ranking")
                if s is not None:
                    scores.setdefault(c.name, s)
        info = {k: v for k, v in data.items() if k not in _SCHEMA_KEYS + ("fraction", "ranking")}
        return cls(
            model=data["model"], task=data["task"], method=data["method"], metric=data["metric"], select=sel,
            components=tuple(c for c, _ in comps), scores=scores, n_total_components=n_total,
            faithfulness=None if faith is None else float(faith), info=info,
        )  # fmt: skip

    @staticmethod
    def _parse_component(rec: Any, i: int, bad, field_name: str = "components") -> tuple[Component, float | None]:
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str):
            raise bad(f"{field_name}[{i}] must be an object with a 'name' like 'L1H2' or 'MLP0', found {rec!r}")
        try:
            c = Component.parse(rec["name"])
        except ArithInterpError as exc:
            raise bad(f"{field_name}[{i}]: {exc}".rstrip(".")) from exc
        for key, want in (("kind", c.kind), ("layer", c.layer), ("head", c.head)):
            if key in rec and rec[key] != want:
                raise bad(f"{field_name}[{i}] ({c.name}) has {key}={rec[key]!r} but its name says {want!r}")
        s = rec.get("score")
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
            raise bad(f"{field_name}[{i}] ({c.name}) has score {s!r}; scores are finite numbers or null")
        return c, None if s is None else float(s)
