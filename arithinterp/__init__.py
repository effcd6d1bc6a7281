"""arithinterp: find, explain and edit the circuits transformers use for arithmetic."""

from arithinterp._errors import ArithInterpError, ArithInterpWarning
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

__version__ = "0.1.0"

__all__ = [
    "ActivationStore",
    "ArithInterpError",
    "ArithInterpWarning",
    "AttributionResult",
    "Circuit",
    "Component",
    "DEFAULT_MODEL",
    "Dataset",
    "Edge",
    "Example",
    "METRICS",
    "Metric",
    "PatchResult",
    "PathGraph",
    "ProbeConfig",
    "Receiver",
    "Selection",
    "Site",
    "StoreConfig",
    "TASKS",
    "TaskConfig",
    "TaskStream",
    "activation_patch",
    "all_components",
    "attribution_patch",
    "collect",
    "direct_logit_attribution",
    "filter_correct",
    "fourier_fit",
    "iterative_path_patch",
    "list_builtins",
    "load",
    "load_jsonl",
    "locate",
    "logit_lens",
    "make_dataset",
    "make_metric",
    "patch_components",
    "path_patch",
    "probe",
    "probe_store",
    "write_store",
]
