"""The on-disk layout of an activation store: file names, the streaming safetensors writer, checksums, and the
checks that decide whether a folder is resumed, returned, refused or cleared (`arithinterp.store` writes and
reads stores through these; see its docstring for the layout and the crash-safety rules)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from arithinterp._errors import ArithInterpError

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in (len(head).to_bytes(8, "little"), head, *views):
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return 8 + len(head) + offset, digest.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def shard_ok(out: Path, record: dict[str, Any]) -> bool:
    for name, digest in ((record["file"], record["sha256"]), (record["examples_file"], record["examples_sha256"])):
        if not (out / name).is_file() or sha256_file(out / name) != digest:
            return False
    return True


_PLAN_KEYS_IGNORED = {"complete", "shards", "version"}


def prepare_store_dir(out: Path, plan: dict[str, Any], *, overwrite: bool) -> list[dict[str, Any]]:
    """Make `out` ready for `plan`; returns the shard records that are already written and intact."""
    if out.exists() and not out.is_dir():
        raise ArithInterpError(f"store folder {str(out)!r} is a file; pass a folder path.")
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
                if not shard_ok(out, record):
                    break
                kept.append(record)
            remove_strays(out, keep={r[k] for r in kept for k in ("file", "examples_file")})
            return kept
        if not overwrite:
            raise ArithInterpError(f"folder {str(out)!r} holds a store made with other settings (differs "
                                   f"in: {', '.join(differs)}); pass another --out, or --overwrite to replace "
                                   "it.")  # fmt: skip
    elif any(out.iterdir()) and not overwrite:
        raise ArithInterpError(f"folder {str(out)!r} is not empty and holds no activation store; pass another "
                               "--out, or --overwrite to write the store into it.")  # fmt: skip
    remove_strays(out, keep=set())
    if manifest_path.is_file():
        manifest_path.unlink()
    return []


def check_store_dir(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse, before any slow work, a folder that `write_store` would refuse; creates nothing.

    Accepted: a missing or empty folder, or one holding an activation store (resumed, returned or, with
    different settings, refused later by `write_store` unless `overwrite`).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArithInterpError(f"--out {str(out)!r} is a file, not a folder; pass a folder path.")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not overwrite:
        raise ArithInterpError(f"folder {str(out)!r} is not empty and holds no activation store; pass another "
                               "--out, or --overwrite to write the store into it.")  # fmt: skip
    return out


def remove_strays(out: Path, keep: set[str]) -> None:
    """Delete shard files not in `keep` and temporary files of interrupted writes (store files only)."""
    for p in out.iterdir():
        if p.is_file() and ((_SHARD_RE.match(p.name) and p.name not in keep) or _TMP_RE.match(p.name)):
            p.unlink()
