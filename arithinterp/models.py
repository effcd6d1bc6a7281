"""Resolve a model spec to a transformer-lens `TransformerBridge`.

A spec is, in this order of precedence:

1. the name of a built-in model: a folder `data/models/<name>/` shipped with arithinterp;
2. a path to an existing local Hugging Face folder (`config.json` + `model.safetensors` + tokenizer);
3. a Hugging Face hub name such as `gpt2`, fetched (and cached) by `transformers`.

Only safetensors weights, or PyTorch checkpoints that load with `weights_only=True`, are ever read, and
remote code is never trusted unless the caller asks for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from arithinterp._errors import ArithInterpError


def _builtin_dir() -> Path:
    """`<repo>/data/models` in a checkout; `arithinterp/_data/models` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "data" / "models", here / "_data" / "models"):
        if candidate.is_dir():
            return candidate
    return here.parent / "data" / "models"


#: Where the built-in models live: `data/models/<name>/`.
BUILTIN_DIR = _builtin_dir()

DEFAULT_MODEL = "tiny-add"


@dataclass(frozen=True, kw_only=True)
class BuiltinModel:
    name: str
    path: Path
    description: str
    size_mb: float


def list_builtins() -> list[BuiltinModel]:
    """The built-in models found under `data/models/` (each folder with a `config.json`)."""
    found = []
    if BUILTIN_DIR.is_dir():
        for d in sorted(BUILTIN_DIR.iterdir()):
            if (d / "config.json").is_file():
                card = d / "arithinterp.json"
                info = json.loads(card.read_text()) if card.is_file() else {}
                desc = info.get("description", "")
                if info.get("finished") is False:
                    desc += " [training unfinished: see arithinterp.json]"
                size = sum(f.stat().st_size for f in d.iterdir() if f.is_file()) / 1e6
                found.append(BuiltinModel(name=d.name, path=d, description=desc, size_mb=round(size, 2)))
    return found


def resolve(spec: str) -> tuple[str, str]:
    """Classify `spec`: returns `(kind, location)` with kind one of "builtin", "local", "hub"."""
    if not spec or not str(spec).strip():
        raise ArithInterpError(
            "model spec is empty; pass a built-in name (see `arithinterp models`), a folder or a hub name."
        )
    spec = str(spec)
    builtin = BUILTIN_DIR / spec
    if "/" not in spec and (builtin / "config.json").is_file():
        return "builtin", str(builtin)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ArithInterpError(f"model {spec!r} is a file; pass the Hugging Face folder that contains config.json.")
        if not (path / "config.json").is_file():
            raise ArithInterpError(f"model folder {spec!r} has no config.json; pass a Hugging Face model folder.")
        _check_weights(path)
        return "local", str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec and len(spec.split("/")) > 2:
        raise ArithInterpError(
            f"model folder {spec!r} does not exist; check the path, or pass a built-in name (see `arithinterp models`)."
        )
    return "hub", spec


def _check_weights(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        return  # transformers loads these with weights_only=True (torch >= 2.6)
    raise ArithInterpError(
        f"model folder {str(folder)!r} has no safetensors or PyTorch weights; save the model with save_pretrained()."
    )


def load(spec: str = DEFAULT_MODEL, *, device: str = "cpu", trust_remote_code: bool = False):
    """Load `spec` as a `TransformerBridge` in eval mode (see the module docstring for the order)."""
    kind, location = resolve(spec)
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(location, device=device, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(spec, kind, location, exc) from exc
    bridge.eval()
    bridge.arithinterp_spec = spec  # recorded in every result file
    return bridge


def load_hf(spec: str):
    """The plain Hugging Face causal LM (float32, eval mode), its tokenizer and its folder or hub name.

    For code that edits weights in place (`arithinterp.finetune`); analyses use `load`'s TransformerBridge.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, location = resolve(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, kind, location, exc) from exc
    return model.eval(), tokenizer, location


def _load_error(spec: str, kind: str, location: str, exc: Exception) -> ArithInterpError:
    if kind == "hub":
        return ArithInterpError(
            f"could not fetch model {spec!r} from the Hugging Face hub (offline, or no such model); "
            "download it where the hub is reachable and pass its folder with --model /path/to/folder."
        )
    return ArithInterpError(f"could not load model folder {location!r}: {exc}".splitlines()[0])


def is_builtin(spec: str) -> bool:
    return "/" not in spec and (BUILTIN_DIR / spec / "config.json").is_file()
