"""Training: a resumed run ends bit-identical to an uninterrupted one; settings are checked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from arithinterp import ArithInterpError
from arithinterp.train import TrainConfig, encode_addition, train

SMALL = dict(n_layer=1, n_head=2, d_model=32, d_mlp=64, steps=12, batch_size=16, n_test=20, eval_every=6,
             checkpoint_every=4, warmup=2)  # fmt: skip


def test_encoding_worked_on_paper():
    seq, first = encode_addition(torch.tensor([123]), torch.tensor([459]), 3)
    from arithinterp.tokenizer import build_char_tokenizer

    assert build_char_tokenizer().decode(seq[0].tolist()) == "<bos>123+459=2850<eos>"
    assert first == 9  # index of the first answer token


def test_resume_is_bit_identical(tmp_path):
    cfg = TrainConfig(**SMALL)
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "resumed", progress=False, max_steps_this_run=5)
    assert part == {"finished": False, "step": 5}
    assert (tmp_path / "resumed" / "checkpoint" / "checkpoint.pt").is_file()
    done = train(cfg, tmp_path / "resumed", progress=False)
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["held_out"] == done["held_out"]
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "full").iterdir() if f.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes  # model.safetensors too, though transformers writes it 0600
    last = json.loads((tmp_path / "full" / "training_log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 12 and "exact_match" in last and "loss" in last


def test_fused_gelu_computes_the_saved_models_function(tmp_path):
    """Training runs the MLPs with torch's fused tanh GELU; the saved folder loads with `gelu_new`. The two models
    give the same logits (to float rounding), and the fused one is what build_model returns."""
    from transformers import GPT2LMHeadModel

    from arithinterp.train import build_model

    model = build_model(TrainConfig(**SMALL), 16).eval()
    assert all(isinstance(block.mlp.act, torch.nn.GELU) for block in model.transformer.h)
    with torch.no_grad():  # large pre-activations, where the tanh approximation's curvature matters
        model.transformer.h[0].mlp.c_fc.weight.mul_(5.0)
    model.save_pretrained(tmp_path / "m")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.activation_function == "gelu_new"
    assert type(loaded.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.equal(ours, torch.zeros_like(ours))


def test_refuses_mismatched_resume_and_nonempty_out(tmp_path):
    cfg = TrainConfig(**SMALL)
    train(cfg, tmp_path / "r", progress=False, max_steps_this_run=2)
    with pytest.raises(ArithInterpError, match="other settings"):
        train(TrainConfig(**{**SMALL, "lr": 5e-4}), tmp_path / "r", progress=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("keep")
    with pytest.raises(ArithInterpError, match="not empty"):
        train(cfg, tmp_path / "x", progress=False)


def test_device_errors_name_the_value():
    from arithinterp.train import resolve_device

    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(ArithInterpError, match="'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ArithInterpError, match="sees no CUDA GPU; use --device cpu"):
            train(TrainConfig(**SMALL), "unused-folder", progress=False, device="cuda")


def test_summary_records_the_device(tmp_path):
    summary = train(TrainConfig(**{**SMALL, "steps": 2}), tmp_path / "r", progress=False, device="cpu")
    assert summary["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_checkpoint_resumes_on_cpu(tmp_path):
    """A run started on the GPU resumes on the CPU (checkpoints are device-free) and ends where a CPU run does,
    up to floating-point rounding."""
    from arithinterp.mul4 import train_mul4

    cfg = TrainConfig(task="mul4-sft", **{**SMALL, "digits": 4, "n_layer": 2})
    assert train_mul4(cfg, tmp_path / "g", progress=False, max_steps_this_run=6, device="cuda")["finished"] is False
    mixed = train_mul4(cfg, tmp_path / "g", progress=False, device="cpu")
    cpu = train_mul4(cfg, tmp_path / "c", progress=False, device="cpu")
    a, b = load_file(tmp_path / "g" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=5e-4) for k in a)  # a wrong data stream differs by ~1e-2
    assert mixed["device"] == cpu["device"] == "cpu"
