"""Activation store: run a task dataset through a model and keep chosen activations, in memory or on disk.

Probes, Fourier fits and PCA views all start from the same thing: the activations of some hook points, at
some token positions, for many examples, next to what is known about each example (operands, digits,
carries, the answer). This module gathers them and stores them; it does not analyse them (`probes` does),
and the file format's mechanics (the streaming safetensors writer, checksums, folder checks) are in `_shards`.

* **Choosing.** Hook points by name or `fnmatch` pattern over the bridge's hook names
  (`"blocks.*.hook_resid_post"`), token positions by index (negative counts from the end). Every prompt of a
  dataset has the same token length, so a position means the same slot in every example.
* **Running.** The hooks are registered once on the `TransformerBridge`; each batch is one ordinary forward
  pass whose hooks copy the selected positions into a preallocated buffer (no cache of everything else).
* **Keeping.** `collect` returns an in-memory `ActivationStore`. `write_store` streams to a folder::

      manifest.json                  model, hooks, shapes, dtype, dataset fingerprint, version, shard checksums
      shard-00000.safetensors        one tensor per hook [example, position, ...] plus the prompt tokens
      shard-00000.examples.jsonl     one line per example: prompts, answer and all metadata (`Example.meta`)
      ...

  A writer thread serialises, hashes and writes one shard while the next is computed; memory holds at most
  two shards, so peak memory does not grow with the number of examples (pass a `TaskStream` instead of a
  `Dataset` to generate the prompts lazily as well).
* **Crash safety.** Every file is written atomically (temporary file, fsync, rename); a shard enters the
  manifest only after its files are in place, and `"complete": true` is written last. A killed write leaves
  a store that `ActivationStore.open` refuses as incomplete; calling `write_store` again with the same
  arguments checks the recorded shards' sha256 checksums and continues from the first missing or damaged
  one. Batches never straddle shards, so a resumed store is byte-identical to an uninterrupted one.
* **Reading.** `ActivationStore.open(folder)` reads shards memory-mapped (`safetensors.safe_open`) and returns
  only the hooks, positions and examples asked for. Each shard's checksum is verified the first time it is
  read (`verify()` checks all of them). `activation_rms(store)` is the one-table summary `arithinterp store`
  reports: the RMS activation of each hook at each position.

Axis names: `example` (one row per dataset example), `pos` (a stored token position), `seq` (all token
positions of a prompt); attention patterns keep the transformer-lens layout `[example, head, pos, k_pos]`
with `pos` the stored query positions.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp._errors import ArithInterpError
from arithinterp._io import atomic_write_bytes, atomic_write_json
from arithinterp._shards import (  # noqa: F401 (check_store_dir is re-exported for the CLI)
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    check_store_dir,
    prepare_store_dir,
    shard_names,
    shard_problem,
    write_safetensors,
)
from arithinterp.tasks import Dataset, Example, TaskConfig, make_dataset

#: The residual stream entering block 0 and leaving every block: one state per layer boundary.
RESIDUAL_HOOKS = ("blocks.0.hook_resid_pre", "blocks.*.hook_resid_post")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_QUERY_AXIS_HOOKS = ("hook_pattern", "hook_attn_scores")  # [batch, head, q_pos, k_pos]: positions on axis 2


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """What to store and how. Defaults: every residual stream, every position, float32."""

    hooks: tuple[str, ...] = RESIDUAL_HOOKS  # hook names or fnmatch patterns over the model's hook names
    positions: tuple[int, ...] | None = None  # token positions (negative = from the end); None = all
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # storage dtype; float16 halves the disk
    batch_size: int = 512  # examples per forward pass
    shard_size: int = 8192  # examples per shard file: memory holds at most two (one computed, one written)
    tokens: Literal["clean", "corrupted"] = "clean"  # which prompts of the dataset are run

    def __post_init__(self) -> None:
        if isinstance(self.hooks, str) or not self.hooks:
            raise ArithInterpError(f"hooks={self.hooks!r} must be a non-empty tuple of hook names or patterns, "
                                   "e.g. ('blocks.*.hook_resid_post',).")  # fmt: skip
        if self.positions is not None and not self.positions:
            raise ArithInterpError("positions=() selects nothing; pass None for every position or some indices.")
        if self.dtype not in DTYPES:
            raise ArithInterpError(f"dtype {self.dtype!r} is not supported; choose one of: {', '.join(DTYPES)}.")
        if self.batch_size < 1:
            raise ArithInterpError(f"batch_size={self.batch_size} must be >= 1.")
        if self.shard_size < 1:
            raise ArithInterpError(f"shard_size={self.shard_size} must be >= 1 (examples per shard).")
        if self.tokens not in ("clean", "corrupted"):
            raise ArithInterpError(f"tokens={self.tokens!r} must be 'clean' or 'corrupted'.")


# ---------------------------------------------------------------------------------------------------------
# Sources of examples


class TaskStream:
    """A long task dataset generated lazily, chunk by chunk, so that memory does not grow with `n`.

    Chunk `k` is `make_dataset(tokenizer, config)` with `n = chunk_size` (the last chunk: the remainder) and a
    seed derived from `(config.seed, k)`; the whole stream is a pure function of `(config, chunk_size)`. Use it
    with `write_store` for stores of hundreds of thousands of examples; for small ones a `Dataset` is simpler.
    """

    def __init__(self, tokenizer, config: TaskConfig, *, chunk_size: int = 4096):
        if chunk_size < 1:
            raise ArithInterpError(f"chunk_size={chunk_size} must be >= 1.")
        self.tokenizer, self.config, self.chunk_size = tokenizer, config, chunk_size
        self._cache: tuple[int, Dataset] | None = None

    def __len__(self) -> int:
        return self.config.n

    def fingerprint(self) -> str:
        spec = json.dumps({"stream": asdict(self.config), "chunk_size": self.chunk_size}, sort_keys=True)
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    def chunk(self, k: int) -> Dataset:
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        n = min(self.chunk_size, len(self) - k * self.chunk_size)
        seed = int(hashlib.sha256(f"{self.config.seed}:{k}".encode()).hexdigest()[:12], 16)
        ds = make_dataset(self.tokenizer, replace(self.config, n=n, seed=seed))
        self._cache = (k, ds)
        return ds

    def slice(self, start: int, stop: int) -> Dataset:
        """Examples `start..stop-1` as one `Dataset` (generating only the chunks that cover them)."""
        parts = []
        for k in range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1):
            lo = max(start - k * self.chunk_size, 0)
            hi = min(stop - k * self.chunk_size, self.chunk_size)
            ds = self.chunk(k)
            parts.append(ds if (lo, hi) == (0, len(ds)) else ds.subset(list(range(lo, hi))))
        return _concat(parts)


def _concat(parts: list[Dataset]) -> Dataset:
    if len(parts) == 1:
        return parts[0]
    if len({p.clean_tokens.shape[1] for p in parts}) != 1:
        raise ArithInterpError("the chunks of this TaskStream have prompts of different token lengths; "
                               "use a fixed-width style (digits) or one Dataset instead of a stream.")  # fmt: skip
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])
    return replace(parts[0], examples=[e for p in parts for e in p.examples], clean_tokens=cat("clean_tokens"),
                   corrupted_tokens=cat("corrupted_tokens"), answer_ids=cat("answer_ids"),
                   counterfactual_ids=cat("counterfactual_ids"), positive=None)  # fmt: skip


Source = Dataset | TaskStream


def _slice(source: Source, start: int, stop: int) -> Dataset:
    if isinstance(source, TaskStream):
        return source.slice(start, stop)
    if (start, stop) == (0, len(source)):
        return source
    return source.subset(list(range(start, stop)))


_EXAMPLE_FIELDS = [f.name for f in fields(Example)]


def _example_record(index: int, ex: Example) -> dict[str, Any]:
    """The example as a JSON-ready dict (shallow: `dataclasses.asdict` deep-copies and is 10x slower)."""
    return {"index": index, **{k: getattr(ex, k) for k in _EXAMPLE_FIELDS}}


# ---------------------------------------------------------------------------------------------------------
# Hook points


def resolve_hooks(model, patterns: Sequence[str]) -> list[str]:
    """The hook names matching `patterns` (exact names or fnmatch patterns).

    Several names can refer to one hook point (`blocks.0.hook_resid_pre` is an alias of `blocks.0.hook_in`);
    each point is stored once, under its transformer-lens name when it has one.
    """
    hook_dict = model.hook_dict
    names = list(hook_dict)
    chosen: dict[int, str] = {}
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (e.g. blocks.*.hook_resid_post)"
            raise ArithInterpError(f"hook {pattern!r} matches no hook point of this model{hint}; "
                                   "list them with sorted(model.hook_dict).")  # fmt: skip
        for n in hits:
            point = hook_dict[n]
            prev = chosen.get(id(point))
            if prev is None or (prev == point.name and n != point.name):  # prefer the legacy alias
                chosen[id(point)] = n
    return sorted(chosen.values())


def _pos_axis(name: str) -> int:
    return 2 if name.endswith(_QUERY_AXIS_HOOKS) else 1


def _resolve_positions(positions: Sequence[int] | None, seq: int) -> list[int]:
    if positions is None:
        return list(range(seq))
    out = []
    for p in positions:
        if not -seq <= p < seq:
            raise ArithInterpError(f"position {p} is outside the prompts' {seq} tokens; pass -{seq}..{seq - 1}.")
        out.append(p % seq)
    if len(set(out)) != len(out):
        raise ArithInterpError(f"positions {list(positions)} name a token twice; pass each position once.")
    return out


@torch.no_grad()
def _hook_shapes(model, tokens: Int[Tensor, "batch seq"], names: list[str]) -> dict[str, list[int]]:
    """Per-example shape of each hook's activation, in the order the hooks fire (the model's order)."""
    shapes: dict[str, list[int]] = {}

    def grab(name):
        def hook(x, hook):
            shapes[name] = list(x.shape[1:])

        return hook

    with model.hooks(fwd_hooks=[(n, grab(n)) for n in names]):
        model(tokens[:1])
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ArithInterpError(f"hook points {missing} did not fire in a forward pass; choose other hooks.")
    return shapes


class _Capture:
    """Forward hooks that copy the selected positions of each hook into the current buffer rows."""

    def __init__(self, names: list[str], positions: list[int], seq: int, dtype: torch.dtype):
        self.names, self.dtype = names, dtype
        self.index = None if positions == list(range(seq)) else torch.tensor(positions)
        self.buffers: dict[str, Tensor] = {}
        self.rows = slice(0, 0)

    def hooks(self) -> list[tuple[str, Any]]:
        def make(name: str):
            axis = _pos_axis(name)

            def hook(x, hook):
                if self.index is not None:
                    if self.index.device != x.device:
                        self.index = self.index.to(x.device)
                    x = x.index_select(axis, self.index)
                self.buffers[name][self.rows].copy_(x)

            return hook

        return [(n, make(n)) for n in self.names]


def _plan(model, source: Source, config: StoreConfig) -> dict[str, Any]:
    """The manifest of a store for these arguments, without shards (what a resumed run must match)."""
    if len(source) < 1:
        raise ArithInterpError("the dataset is empty; pass a dataset with at least one example.")
    names = resolve_hooks(model, config.hooks)
    first = _slice(source, 0, 1)
    tokens = getattr(first, f"{config.tokens}_tokens")
    seq = int(tokens.shape[1])
    positions = _resolve_positions(config.positions, seq)
    shapes = _hook_shapes(model, tokens, names)
    hooks = {}
    for n in shapes:  # in the order the hooks fire: model order
        shape, axis = list(shapes[n]), _pos_axis(n)
        if shape[axis - 1] != seq:
            raise ArithInterpError(f"hook {n!r} has shape {shape} with no axis of the {seq} positions; "
                                   "choose a hook with a position axis.")  # fmt: skip
        shape[axis - 1] = len(positions)
        axes = ["head", "pos", "k_pos"] if axis == 2 else ["pos"] + _feature_axes(model, shape[1:])
        hooks[n] = {"shape": shape, "axes": ["example"] + axes}
    tok = getattr(model, "tokenizer", None)
    labels = [tok.decode([int(t)]) if tok is not None else str(int(t)) for t in tokens[0]]
    task = first.config if isinstance(source, Dataset) else source.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "version": _version(),
        "model": getattr(model, "arithinterp_spec", None) or type(model).__name__,
        "model_config": _model_config(model),
        "model_fingerprint": model_fingerprint(model),
        "task": {**asdict(task), "n": len(source), "style": first.style},
        "dataset_fingerprint": source.fingerprint(),
        "source": "stream" if isinstance(source, TaskStream) else "dataset",
        "n_examples": len(source),
        "tokens": config.tokens,
        "seq_len": seq,
        "positions": positions,
        "position_labels": [labels[p] for p in positions],
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "shard_size": config.shard_size,
        "hooks": hooks,
        "meta_keys": sorted(first.examples[0].meta),
        "shards": [],
    }


def _feature_axes(model, dims: list[int]) -> list[str]:
    """Names of the per-position axes: `d_model`, `d_mlp`, `head d_head`, or `dim<i>` when unsure."""
    cfg = model.cfg
    named = {getattr(cfg, "d_model", None): "d_model", getattr(cfg, "d_mlp", None): "d_mlp"}
    if len(dims) == 1 and dims[0] in named:
        return [named[dims[0]]]
    if len(dims) == 2 and dims == [getattr(cfg, "n_heads", None), getattr(cfg, "d_head", None)]:
        return ["head", "d_head"]
    return [f"dim{i}" for i in range(len(dims))]


def _version() -> str:
    from arithinterp import __version__

    return __version__


def _model_config(model) -> dict[str, Any]:
    cfg = model.cfg
    keys = ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_ctx")
    return {k: int(getattr(cfg, k)) for k in keys if isinstance(getattr(cfg, k, None), int)}


def model_fingerprint(model) -> str:
    """A short hash of the parameter names, shapes and leading values: changes when the weights change."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Writing


@torch.no_grad()
def _fill(model, tokens: Tensor, capture: _Capture, batch_size: int, bar) -> None:
    for b0 in range(0, tokens.shape[0], batch_size):
        batch = tokens[b0 : b0 + batch_size]
        capture.rows = slice(b0, b0 + batch.shape[0])
        model(batch)
        bar.update(batch.shape[0])


def _buffers(plan: dict[str, Any], n: int) -> dict[str, Tensor]:
    dtype = DTYPES[plan["dtype"]]
    return {name: torch.empty((n, *h["shape"]), dtype=dtype) for name, h in plan["hooks"].items()}


def collect(model, dataset: Dataset, config: StoreConfig | None = None, *, progress: bool = True) -> ActivationStore:
    """Run `dataset` through `model` and keep the chosen activations in memory."""
    config = config or StoreConfig()
    plan = _plan(model, dataset, config)
    tokens = getattr(dataset, f"{config.tokens}_tokens")
    capture = _Capture(list(plan["hooks"]), plan["positions"], plan["seq_len"], DTYPES[config.dtype])
    capture.buffers = _buffers(plan, len(dataset))
    with model.hooks(fwd_hooks=capture.hooks()), tqdm(total=len(dataset), desc="store", unit="ex",
                                                      disable=not progress) as bar:  # fmt: skip
        _fill(model, tokens, capture, config.batch_size, bar)
    plan["complete"] = True
    examples = [_example_record(i, e) for i, e in enumerate(dataset.examples)]
    return ActivationStore(manifest=plan, tensors={**capture.buffers, "tokens": tokens.clone()}, examples=examples)


def write_store(
    model, source: Source, out: str | Path, config: StoreConfig | None = None, *, overwrite: bool = False,
    progress: bool = True,
) -> ActivationStore:  # fmt: skip
    """Stream the chosen activations of `source` to the folder `out`; resumes an interrupted write.

    `out` may be missing or empty (a new store), hold an unfinished store made with the same arguments (it is
    resumed from the first shard that is missing or fails its checksum), or hold a finished one (its checksums
    are verified and it is returned; a damaged shard is rewritten). Anything else is refused unless
    `overwrite`, which deletes the store files found there (and nothing else) first.
    """
    config = config or StoreConfig()
    out = Path(out)
    plan = _plan(model, source, config)
    done = prepare_store_dir(out, plan, overwrite=overwrite)
    manifest = {**plan, "shards": done}
    n = len(source)
    bounds = [(s, min(s + config.shard_size, n)) for s in range(0, n, config.shard_size)]
    if len(done) == len(bounds):
        manifest["complete"] = True
        atomic_write_json(out / MANIFEST, manifest)
        return ActivationStore.open(out)
    atomic_write_json(out / MANIFEST, manifest)
    capture = _Capture(list(plan["hooks"]), plan["positions"], plan["seq_len"], DTYPES[config.dtype])
    first = bounds[len(done)][0]

    def finish(index: int, start: int, stop: int, tensors: dict[str, Tensor], ds: Dataset) -> None:
        manifest["shards"].append(_write_shard(out, index, start, stop, tensors, ds))
        atomic_write_json(out / MANIFEST, manifest)  # a shard is on record only once its files are in place

    # One writer thread serialises, hashes and writes shard k while shard k+1 is computed. At most one write
    # is pending, so memory holds at most two shard buffers whatever the number of examples.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as writer, \
            model.hooks(fwd_hooks=capture.hooks()), \
            tqdm(total=n, initial=first, desc="store", unit="ex", disable=not progress) as bar:  # fmt: skip
        pending = None
        for index in range(len(done), len(bounds)):
            start, stop = bounds[index]
            ds = _slice(source, start, stop)
            tokens = getattr(ds, f"{config.tokens}_tokens")
            if tokens.shape[1] != plan["seq_len"]:
                raise ArithInterpError(f"examples {start}..{stop - 1} have {tokens.shape[1]} tokens, not "
                                       f"{plan['seq_len']}; every prompt of a store must have one length.")  # fmt: skip
            capture.buffers = _buffers(plan, stop - start)
            _fill(model, tokens, capture, config.batch_size, bar)
            if pending is not None:
                pending.result()  # raises the writer's error, if any
            pending = writer.submit(finish, index, start, stop, {**capture.buffers, "tokens": tokens.contiguous()}, ds)
            capture.buffers = {}
        if pending is not None:
            pending.result()
    manifest["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)
    return ActivationStore.open(out)


def _write_shard(out: Path, index: int, start: int, stop: int, tensors: dict[str, Tensor], ds: Dataset):
    tensor_file, examples_file = shard_names(index)
    nbytes, digest = write_safetensors(out / tensor_file, tensors, metadata={"examples": f"{start}:{stop}"})
    lines = "".join(json.dumps(_example_record(start + i, e)) + "\n" for i, e in enumerate(ds.examples))
    text = lines.encode("utf-8")
    atomic_write_bytes(out / examples_file, text)
    return {"file": tensor_file, "start": start, "stop": stop, "bytes": nbytes, "sha256": digest,
            "examples_file": examples_file, "examples_sha256": hashlib.sha256(text).hexdigest()}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Reading


class ActivationStore:
    """Stored activations per hook, `[example, pos, ...]`, with each example's record (prompts, metadata).

    Built by `collect` (in memory) or `write_store` / `ActivationStore.open` (on disk, memory-mapped). `get`
    returns only the hooks, positions and examples asked for.
    """

    def __init__(self, *, manifest: dict[str, Any], root: Path | None = None,
                 tensors: dict[str, Tensor] | None = None, examples: list[dict[str, Any]] | None = None):  # fmt: skip
        self.manifest = manifest
        self.root = root
        self._tensors = tensors
        self._examples = examples
        self._verified: set[int] = set()

    # -- opening ------------------------------------------------------------------------------------------

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: Sequence[dict[str, Any]], *,
                     position_labels: Sequence[str] | None = None) -> ActivationStore:  # fmt: skip
        """An in-memory store of activations computed elsewhere: `tensors[hook]` is `[example, pos, ...]`
        (every hook with the same positions) and `meta[i]` the metadata of example i."""
        if not tensors:
            raise ArithInterpError("from_tensors needs at least one hook tensor.")
        n, seq = next(iter(tensors.values())).shape[:2]
        for name, t in tensors.items():
            if t.dim() < 2 or t.shape[:2] != (n, seq):
                raise ArithInterpError(f"tensor {name!r} has shape {tuple(t.shape)}; every tensor must be "
                                       f"[example={n}, pos={seq}, ...].")  # fmt: skip
        if len(meta) != n:
            raise ArithInterpError(f"{len(meta)} metadata records for {n} examples; pass one per example.")
        dtype = {v: k for k, v in DTYPES.items()}.get(next(iter(tensors.values())).dtype, "float32")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "complete": True, "version": _version(),
            "model": None, "n_examples": n, "seq_len": seq, "positions": list(range(seq)),
            "position_labels": list(position_labels) if position_labels is not None else [str(p) for p in range(seq)],
            "dtype": dtype, "hooks": {k: {"shape": list(t.shape[1:]), "axes": ["example", "pos"]
                                          + [f"dim{i}" for i in range(t.dim() - 2)]} for k, t in tensors.items()},
            "meta_keys": sorted(meta[0]) if n else [], "shards": [],
        }  # fmt: skip
        examples = [{"index": i, "meta": dict(m)} for i, m in enumerate(meta)]
        return cls(manifest=manifest, tensors={k: t.to(DTYPES[dtype]) for k, t in tensors.items()}, examples=examples)

    @classmethod
    def open(cls, path: str | Path) -> ActivationStore:
        """Open a finished store written by `write_store` (refuses unfinished or foreign folders)."""
        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise ArithInterpError(f"{str(root)!r} is not an activation store (no {MANIFEST}); "
                                   "write one with `arithinterp store` or write_store().")  # fmt: skip
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError as exc:
            raise ArithInterpError(f"{str(mpath)!r} is not valid JSON ({exc}); rerun the store command.") from exc
        if manifest.get("format") != FORMAT:
            raise ArithInterpError(f"{str(mpath)!r} is not an arithinterp activation store manifest.")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ArithInterpError(f"store {str(root)!r} has format version {manifest['format_version']}; "
                                   "upgrade arithinterp to read it.")  # fmt: skip
        if not manifest.get("complete"):
            raise ArithInterpError(
                f"store {str(root)!r} is incomplete ({len(manifest.get('shards', []))} shards written, "
                f"{manifest.get('n_examples')} examples planned); rerun the same store command to resume it."
            )
        return cls(manifest=manifest, root=root)

    # -- description --------------------------------------------------------------------------------------

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def positions(self) -> list[int]:
        """The stored token positions (absolute indices into the prompt)."""
        return list(self.manifest["positions"])

    @property
    def n(self) -> int:
        return int(self.manifest["n_examples"])

    def __len__(self) -> int:
        return self.n

    def shape(self, hook: str) -> tuple[int, ...]:
        """Full shape of a hook's stored tensor, `(example, ...)`."""
        return (self.n, *self._hook(hook)["shape"])

    def __repr__(self) -> str:
        where = f"at {str(self.root)!r}" if self.root is not None else "in memory"
        return f"ActivationStore({self.n} examples, {len(self.hooks)} hooks, positions {self.positions}, {where})"

    def _hook(self, hook: str) -> dict[str, Any]:
        if hook not in self.manifest["hooks"]:
            raise ArithInterpError(f"hook {hook!r} is not in this store; it holds: {', '.join(self.hooks)}.")
        return self.manifest["hooks"][hook]

    # -- tensors ------------------------------------------------------------------------------------------

    def get(
        self, hook: str, *, positions: Sequence[int] | None = None,
        examples: slice | Sequence[int] | np.ndarray | Tensor | None = None,
    ) -> Float[Tensor, "example ..."]:  # fmt: skip
        """Activations of `hook` for the chosen token `positions` (absolute or negative token indices,
        default all stored) and `examples` (indices or a slice, default all), `[example, pos, ...]`."""
        info = self._hook(hook)
        axis = info["axes"].index("pos")
        pos_index = self._pos_index(positions)
        rows = self._rows(examples)
        if self._tensors is not None:
            return self._select(self._tensors[hook][torch.as_tensor(rows)], axis, pos_index)
        shape = list(info["shape"])
        if pos_index is not None:
            shape[axis - 1] = len(pos_index)
        out = torch.empty((len(rows), *shape), dtype=DTYPES[self.manifest["dtype"]])
        for shard_i, where, local in self._by_shard(rows):
            block = self._read(shard_i, hook, local)
            out[torch.as_tensor(where)] = self._select(block, axis, pos_index)
        return out

    def tokens(self, examples: slice | Sequence[int] | None = None) -> Int[Tensor, "example seq"]:
        """The prompt tokens that were run (all positions)."""
        rows = self._rows(examples)
        if self._tensors is not None:
            if "tokens" not in self._tensors:
                raise ArithInterpError("this store was built from tensors without prompt tokens.")
            return self._tensors["tokens"][torch.as_tensor(rows)]
        out = torch.empty((len(rows), self.manifest["seq_len"]), dtype=torch.long)
        for shard_i, where, local in self._by_shard(rows):
            out[torch.as_tensor(where)] = self._read(shard_i, "tokens", local)
        return out

    def iter_shards(self, hook: str, *, positions: Sequence[int] | None = None):
        """Yield `(start, activations)` one shard at a time: a full pass in bounded memory."""
        bounds = [(0, self.n)] if self._tensors is not None else [(s["start"], s["stop"]) for s in self._shards]
        for start, stop in bounds:
            yield start, self.get(hook, positions=positions, examples=slice(start, stop))

    def _pos_index(self, positions: Sequence[int] | None) -> list[int] | None:
        if positions is None:
            return None
        stored = self.positions
        seq = self.manifest["seq_len"]
        out = []
        for p in positions:
            absolute = p % seq if -seq <= p < seq else None
            if absolute not in stored:
                raise ArithInterpError(f"position {p} is not in this store; it holds positions {stored}.")
            out.append(stored.index(absolute))
        return out

    @staticmethod
    def _select(x: Tensor, axis: int, pos_index: list[int] | None) -> Tensor:
        return x if pos_index is None else x.index_select(axis, torch.tensor(pos_index, dtype=torch.long))

    def _rows(self, examples) -> np.ndarray:
        if examples is None:
            return np.arange(self.n)
        if isinstance(examples, slice):
            return np.arange(self.n)[examples]
        rows = np.asarray(examples.cpu() if isinstance(examples, Tensor) else examples, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < -self.n or rows.max() >= self.n):
            raise ArithInterpError(f"example indices must lie in 0..{self.n - 1}; got {rows.min()}..{rows.max()}.")
        return rows % self.n if rows.size else rows

    @property
    def _shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    def _by_shard(self, rows: np.ndarray):
        """For each shard holding some of `rows`: (shard index, positions in `rows`, rows local to the shard)."""
        starts = np.array([s["start"] for s in self._shards])
        which = np.searchsorted(starts, rows, side="right") - 1
        for shard_i in np.unique(which):
            where = np.nonzero(which == shard_i)[0]
            yield int(shard_i), where, rows[where] - starts[shard_i]

    def _read(self, shard_i: int, key: str, local: np.ndarray) -> Tensor:
        """Rows `local` of tensor `key` in shard `shard_i`, reading only the span they cover (memory-mapped)."""
        self._verify_shard(shard_i)
        lo, hi = int(local.min()), int(local.max()) + 1
        with safe_open(self.root / self._shards[shard_i]["file"], framework="pt") as f:
            block = f.get_slice(key)[lo:hi]
        if len(local) == hi - lo and np.all(np.diff(local) == 1):
            return block
        return block[torch.as_tensor(local - lo)]

    # -- integrity ----------------------------------------------------------------------------------------

    def _verify_shard(self, shard_i: int) -> None:
        if shard_i in self._verified or self.root is None:
            return
        problem = shard_problem(self.root, self._shards[shard_i])
        if problem is not None:
            raise ArithInterpError(problem)
        self._verified.add(shard_i)

    def verify(self) -> None:
        """Check every shard against the manifest's checksums; raises `ArithInterpError` on the first bad one."""
        if self.root is not None:
            for i in range(len(self._shards)):
                self._verify_shard(i)

    # -- per-example records ------------------------------------------------------------------------------

    @property
    def examples(self) -> list[dict[str, Any]]:
        """One record per example: `index`, `clean`, `corrupted`, `answer`, ..., and `meta` (all metadata)."""
        if self._examples is None:
            records = []
            for i, shard in enumerate(self._shards):
                self._verify_shard(i)
                with open(self.root / shard["examples_file"], encoding="utf-8") as f:
                    records += [json.loads(line) for line in f]
            self._examples = records
        return self._examples

    @property
    def meta(self) -> list[dict[str, Any]]:
        """Each example's metadata (`Example.meta`: operands, digits, carries, result, ...)."""
        return [r["meta"] for r in self.examples]


# ---------------------------------------------------------------------------------------------------------
# Summary


def activation_rms(store: ActivationStore, *, max_examples: int | None = None) -> Float[np.ndarray, "hook pos"]:
    """Root-mean-square activation of each hook (rows, in `store.hooks` order) at each stored position (columns),
    over the first `max_examples` examples (default all) and every feature.

    A hook whose axis after `example` is not `pos` (attention patterns, `[example, head, pos, k_pos]`) gets a row
    of NaN. Scales that differ by orders of magnitude between hooks or positions show at a glance.
    """
    rows = np.arange(store.n if max_examples is None else min(store.n, max_examples))
    return np.stack([store.get(h, examples=rows).float().pow(2).flatten(2).mean(-1).mean(0).sqrt().numpy()
                     if store.manifest["hooks"][h]["axes"][1] == "pos" else np.full(len(store.positions), np.nan)
                     for h in store.hooks])  # fmt: skip
