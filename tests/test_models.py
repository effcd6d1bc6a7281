"""Model specs: built-in, local folder, hub name; clear errors; no network."""

from __future__ import annotations

import pytest
import torch

from arithinterp import ArithInterpError
from arithinterp.models import BUILTIN_DIR, list_builtins, load, resolve


def test_resolve_order(tmp_path, tiny_model_dir):
    assert resolve(str(tiny_model_dir)) == ("local", str(tiny_model_dir))
    assert resolve("gpt2") == ("hub", "gpt2")
    assert resolve("EleutherAI/pythia-70m") == ("hub", "EleutherAI/pythia-70m")
    if (BUILTIN_DIR / "tiny-add" / "config.json").is_file():
        assert resolve("tiny-add")[0] == "builtin"
        assert "tiny-add" in [m.name for m in list_builtins()]


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no config.json"),
])  # fmt: skip
def test_bad_local_specs(tmp_path, make, match):
    with pytest.raises(ArithInterpError, match=match):
        resolve(str(make(tmp_path)) if "missing" not in match else "./" + str(make(tmp_path).name))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ArithInterpError, match="no safetensors"):
        resolve(str(tmp_path))


def test_hub_failure_is_one_clear_sentence(monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", offline)
    with pytest.raises(ArithInterpError, match=r"could not fetch model 'gpt2'.*--model /path/to/folder"):
        load("gpt2")


def test_load_local_folder_matches_hf(tiny_model_dir, tiny_model):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    tokens = torch.tensor([[1, 4, 5, 16, 7, 8, 17]])
    assert not tiny_model.training
    with torch.no_grad():
        assert torch.allclose(tiny_model(tokens), hf(tokens).logits, atol=1e-5)
