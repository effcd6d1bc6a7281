"""arithinterp: find, explain and edit the circuits transformers use for arithmetic."""

from arithinterp._errors import ArithInterpError, ArithInterpWarning
from arithinterp.metrics import METRICS, Metric, make_metric
from arithinterp.models import DEFAULT_MODEL, list_builtins, load
from arithinterp.patching import Component, PatchResult, all_components, patch_components
from arithinterp.tasks import TASKS, Dataset, Example, TaskConfig, filter_correct, load_jsonl, make_dataset

__version__ = "0.1.0"

__all__ = [
    "ArithInterpError",
    "ArithInterpWarning",
    "Component",
    "DEFAULT_MODEL",
    "Dataset",
    "Example",
    "METRICS",
    "Metric",
    "PatchResult",
    "TASKS",
    "TaskConfig",
    "all_components",
    "filter_correct",
    "list_builtins",
    "load",
    "load_jsonl",
    "make_dataset",
    "make_metric",
    "patch_components",
]
