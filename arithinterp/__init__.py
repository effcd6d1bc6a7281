"""arithinterp: find, explain and edit the circuits transformers use for arithmetic.

The names below are imported on first use (PEP 562), so `import arithinterp.mul4` or the command line's
`--help` does not pull in transformer-lens, plotly and scikit-learn; `from arithinterp import load` works as usual.
"""

# ruff: noqa: F401 (a re-export module: every name imported here is public)

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from arithinterp._errors import ArithInterpError, ArithInterpWarning

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    name: module
    for module, names in {
        "attribution": ("direct_logit_attribution", "logit_lens"),
        "attribution_patching": ("AttributionResult", "attribution_patch"),
        "localize": ("Circuit", "Selection", "locate"),
        "metrics": ("METRICS", "Metric", "make_metric"),
        "models": ("DEFAULT_MODEL", "list_builtins", "load"),
        "patching": ("Component", "PatchResult", "Site", "activation_patch", "all_components", "patch_components"),
        "path_patching": ("Edge", "PathGraph", "Receiver", "iterative_path_patch", "path_patch"),
        "probes": ("ProbeConfig", "fourier_fit", "probe", "probe_store"),
        "store": ("ActivationStore", "StoreConfig", "TaskStream", "collect", "write_store"),
        "tasks": ("TASKS", "Dataset", "Example", "TaskConfig", "filter_correct", "load_jsonl", "make_dataset"),
    }.items()
    for name in names
}

__all__ = sorted(["ArithInterpError", "ArithInterpWarning", *_LAZY])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"arithinterp.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'arithinterp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from arithinterp.attribution import direct_logit_attribution, logit_lens
    from arithinterp.attribution_patching import AttributionResult, attribution_patch
    from arithinterp.localize import Circuit, Selection, locate
    from arithinterp.metrics import METRICS, Metric, make_metric
    from arithinterp.models import DEFAULT_MODEL, list_builtins, load
    from arithinterp.patching import Component, PatchResult, Site, activation_patch, all_components, patch_components
    from arithinterp.path_patching import Edge, PathGraph, Receiver, iterative_path_patch, path_patch
    from arithinterp.probes import ProbeConfig, fourier_fit, probe, probe_store
    from arithinterp.store import ActivationStore, StoreConfig, TaskStream, collect, write_store
    from arithinterp.tasks import TASKS, Dataset, Example, TaskConfig, filter_correct, load_jsonl, make_dataset
