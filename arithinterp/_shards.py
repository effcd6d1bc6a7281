"""The on-disk layout of an activation store: file names, the streaming safetensors writer, checksums, and the
checks that decide whether a folder is resumed, returned, refused or cleared (`arithinterp.store` writes and
reads stores through these; see its docstring for the layout and the crash-safety rules)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from arithinterp._errors import ArithInterpError
from arithinterp._io import atomic_open, refuse_file

FORMAT = "arithinterp-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

_SHARD_RE = re.compile(r"^shard-\d{5}\.(safetensors|examples\.jsonl)$")
_TMP_RE = re.compile(r"^\.(shard-\d{5}\.(safetensors|examples\.jsonl)|manifest\.json)\..*\.tmp$")


def shard_names(index: int) -> tuple[str, str]:
    return f"shard-{index:05d}.safetensors", f"shard-{index:05d}.examples.jsonl"


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
#: safetensors lays tensors out by dtype (in this enum order, last first), then by name
_ST_RANK = {d: i for i, d in enumerate("BOOL U8 I8 F8_E5M2 F8_E4M3 I16 U16 F16 BF16 I32 U32 F32 F64 I64 U64".split())}


def write_safetensors(path: Path, tensors: dict[str, Tensor], *, metadata: dict[str, str]) -> tuple[int, str]:
    """Write `tensors` in the safetensors format, atomically, hashing as it writes; returns (bytes, sha256).

    Byte for byte the file `safetensors.torch.save_file` writes, but streamed from the tensors' memory: no
    second in-memory copy of a shard is made, and the checksum costs no extra pass.
    `metadata` must have at most one key, so that the header is byte-for-byte reproducible.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    views, offset = [], 0
    for name in sorted(tensors, key=lambda k: (-_ST_RANK[_ST_DTYPES[tensors[k].dtype]], k)):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()  # (bytes,) view of the tensor's memory
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + raw.size]}  # fmt: skip
        views.append(raw)
        offset += raw.size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    with atomic_open(path) as f:
        for chunk in (len(head).to_bytes(8, "little"), head, *views):
            digest.update(chunk)
            f.write(chunk)
    return 8 + len(head) + offset, digest.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def shard_problem(root: Path, record: dict[str, Any]) -> str | None:
    """Why the shard of manifest entry `record` cannot be used (its first missing or damaged file), or None."""
    for name, digest in ((record["file"], record["sha256"]), (record["examples_file"], record["examples_sha256"])):
        path = root / name
        if not path.is_file():
            return f"shard file {str(path)!r} is missing; rerun the store command to rewrite it."
        if sha256_file(path) != digest:
            return (f"shard file {str(path)!r} is damaged (its sha256 does not match the manifest); rerun the "
                    "same store command to rewrite it.")  # fmt: skip
    return None


_PLAN_KEYS_IGNORED = {"complete", "shards", "version"}
_NOT_A_STORE = ("folder {out!r} is not empty and holds no activation store; pass another --out, or --overwrite "
                "to write the store into it.")  # fmt: skip


def prepare_store_dir(out: Path, plan: dict[str, Any], *, overwrite: bool) -> list[dict[str, Any]]:
    """Make `out` ready for `plan`; returns the shard records that are already written and intact."""
    out = check_store_dir(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    old = None
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = None
    if old is not None and old.get("format") == FORMAT:
        differs = sorted(k for k in set(plan) | set(old) if k not in _PLAN_KEYS_IGNORED and plan.get(k) != old.get(k))
        if not differs:
            kept = []
            for record in old.get("shards", []):
                if shard_problem(out, record) is not None:
                    break
                kept.append(record)
            remove_strays(out, keep={r[k] for r in kept for k in ("file", "examples_file")})
            return kept
        if not overwrite:
            raise ArithInterpError(f"folder {str(out)!r} holds a store made with other settings (differs "
                                   f"in: {', '.join(differs)}); pass another --out, or --overwrite to replace "
                                   "it.")  # fmt: skip
    elif any(out.iterdir()) and not overwrite:  # a manifest.json, but not a store's: check_store_dir let it by
        raise ArithInterpError(_NOT_A_STORE.format(out=str(out)))
    remove_strays(out, keep=set())
    if manifest_path.is_file():
        manifest_path.unlink()
    return []


def check_store_dir(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse, before any slow work, a folder that `write_store` would refuse; creates nothing.

    Accepted: a missing or empty folder, or one holding an activation store (resumed, returned or, with
    different settings, refused later by `write_store` unless `overwrite`).
    """
    out = refuse_file(out)
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not overwrite:
        raise ArithInterpError(_NOT_A_STORE.format(out=str(out)))
    return out


def remove_strays(out: Path, keep: set[str]) -> None:
    """Delete shard files not in `keep` and temporary files of interrupted writes (store files only)."""
    for p in out.iterdir():
        if p.is_file() and ((_SHARD_RE.match(p.name) and p.name not in keep) or _TMP_RE.match(p.name)):
            p.unlink()
