"""Selective fine-tuning: the slices it trains, the guarantee that nothing else moves, resuming, the CLI, and the
letter-reversal task of tiny-mixed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arithinterp._errors import ArithInterpError
from arithinterp.cli import main
from arithinterp.finetune import FinetuneConfig, Problems, exact_match, finetune, parse_transfer, read_circuit
from arithinterp.models import load_hf
from arithinterp.param_slices import kv_groups, layout, random_components, selection_masks
from arithinterp.patching import Component
from arithinterp.tasks import TaskConfig
from arithinterp.tokenizer import VOCAB
from arithinterp.train import (
    MIXED_ADD_FRACTION,
    encode_reversal,
    mixed_batches,
    reversal_exact_match,
    reversal_held_out,
)
from arithinterp.train import default_config as train_default_config

C = Component.parse
FAST = dict(target=TaskConfig(task="add", digits=2), transfer=(TaskConfig(task="add", digits=1),), n_train=48,
            n_eval=12, epochs=1, batch_size=16, retention="none")  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is fastest, and more threads thrash on a shared two-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, char_tokenizer) -> Path:
    """A 2-layer LLaMA with grouped-query attention (4 query heads, 2 key/value heads, d_head 16) and q/k/v/o
    biases, with the char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_bias=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


# ---------------------------------------------------------------------------------------------------------
# Which entries a head owns (worked out on paper)


def test_gpt2_head_slices(tiny_model_dir):
    model, _, _ = load_hf(str(tiny_model_dir))  # d_model 64, 4 heads, d_head 16
    masks = selection_masks(model, [C("L1H2")])
    assert set(masks) == {"transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias",
                          "transformer.h.1.attn.c_proj.weight"}  # fmt: skip
    w = masks["transformer.h.1.attn.c_attn.weight"]  # [d_model, 3 * d_model]: q | k | v columns
    cols = torch.zeros(192, dtype=torch.bool)
    for start in (32, 64 + 32, 128 + 32):
        cols[start : start + 16] = True
    assert torch.equal(w, cols.expand(64, 192))
    assert torch.equal(masks["transformer.h.1.attn.c_attn.bias"], cols)
    rows = torch.zeros(64, dtype=torch.bool)
    rows[32:48] = True
    assert torch.equal(masks["transformer.h.1.attn.c_proj.weight"], rows[:, None].expand(64, 64))
    mlp = selection_masks(model, [C("MLP0")])
    assert sorted(mlp) == sorted(n for n, _ in model.named_parameters() if n.startswith("transformer.h.0.mlp."))
    assert all(bool(m.all()) for m in mlp.values())


def test_llama_head_slices_share_kv_group(llama_dir):
    model, _, _ = load_hf(str(llama_dir))
    lay = layout(model)
    assert (lay.kind, lay.n_heads, lay.n_kv_heads, lay.d_head) == ("llama", 4, 2, 16)
    masks = selection_masks(model, [C("L1H3")])
    pre = "model.layers.1.self_attn."
    q, kv, o = torch.zeros(64, dtype=torch.bool), torch.zeros(32, dtype=torch.bool), torch.zeros(64, dtype=torch.bool)
    q[48:64], kv[16:32], o[48:64] = True, True, True  # head 3 reads key/value head 3 // 2 = 1
    assert torch.equal(masks[pre + "q_proj.weight"], q[:, None].expand(64, 64))
    assert torch.equal(masks[pre + "q_proj.bias"], q)
    for name in ("k_proj", "v_proj"):
        assert torch.equal(masks[pre + f"{name}.weight"], kv[:, None].expand(32, 64))
        assert torch.equal(masks[pre + f"{name}.bias"], kv)
    assert torch.equal(masks[pre + "o_proj.weight"], o[None, :].expand(64, 64))
    assert pre + "o_proj.bias" not in masks  # shared by all heads of the layer: frozen
    assert kv_groups([C("L1H3"), C("L1H2"), C("L0H0")], lay) == {"L0": [0], "L1": [1]}


def test_random_arm_same_size_outside_selection(tiny_model_dir):
    lay = layout(load_hf(str(tiny_model_dir))[0])
    sel = [C("L0H0"), C("L1H1"), C("MLP2")]
    rnd = random_components(sel, lay, seed=3)
    assert sum(c.kind == "head" for c in rnd) == 2 and sum(c.kind == "mlp" for c in rnd) == 1
    assert not set(rnd) & set(sel)
    assert rnd == random_components(sel, lay, seed=3) and rnd != random_components(sel, lay, seed=4)


def test_components_outside_the_model_are_refused(tiny_model_dir):
    model = load_hf(str(tiny_model_dir))[0]
    with pytest.raises(ArithInterpError, match="L7H0"):
        selection_masks(model, [C("L7H0")])


# ---------------------------------------------------------------------------------------------------------
# The guarantee: nothing outside the selection moves, every selected slice does


def _check_guarantee(input_dir: Path, out: Path, components: list[Component]) -> None:
    model = load_hf(str(input_dir))[0]
    masks = selection_masks(model, components)
    before = {n: p.detach() for n, p in model.named_parameters()}
    after = load_file(str(out / "model.safetensors"))
    for name, old in before.items():
        new = after[name] if name in after else after["transformer.wte.weight"]  # tied lm_head
        keep = ~masks[name] if name in masks else torch.ones_like(old, dtype=torch.bool)
        assert torch.equal(new[keep], old[keep]), f"{name} changed outside the selection"
        if name in masks:
            changed = (new != old)[masks[name]].float().mean().item()
            assert changed > 0.9, f"{name}: only {changed:.2f} of the selected entries changed"


@pytest.mark.parametrize("extra", [{}, {"weight_decay": 0.1, "grad_scale": "heads", "optimizer": "sgd"}])
def test_selective_guarantee_gpt2(tiny_model_dir, tmp_path, extra):
    comps = [C("L1H2"), C("L2H0"), C("MLP0")]
    digest = _digest(tiny_model_dir)
    cfg = FinetuneConfig(**FAST, baselines=(), lr=1e-2 if extra else 1e-3, **extra)
    rec = finetune(str(tiny_model_dir), comps, tmp_path / "out", config=cfg, progress=False)
    assert _digest(tiny_model_dir) == digest  # the input folder is untouched
    _check_guarantee(tiny_model_dir, tmp_path / "out", comps)
    # 3 x (q, k, v) 64x16 + 3 x 16 biases + 16x64 W_O per head; the whole MLP (64x256 + 256 + 256x64 + 64)
    assert rec["arms"]["selective"]["trainable_parameters"] == 2 * (3 * 64 * 16 + 48 + 16 * 64) + 33088
    assert rec["arms"]["selective"]["grad_factor"] == (6.0 if extra else 1.0)  # 12 heads / 2 selected


def test_selective_guarantee_llama(llama_dir, tmp_path):
    comps = [C("L1H3"), C("L0H0")]
    cfg = FinetuneConfig(**FAST, baselines=(), weight_decay=0.05)
    rec = finetune(str(llama_dir), comps, tmp_path / "out", config=cfg, progress=False)
    _check_guarantee(llama_dir, tmp_path / "out", comps)
    arm = rec["arms"]["selective"]
    assert arm["kv_groups"] == {"L0": [0], "L1": [1]} and "grouped-query" in arm["kv_note"]
    # per head: q rows (16x64 + 16), the group's k and v rows (2 x (16x64 + 16)), o columns (64x16)
    assert arm["trainable_parameters"] == 2 * (3 * (16 * 64 + 16) + 64 * 16)


@pytest.mark.slow
def test_baselines_counts_and_report(tiny_model_dir, tmp_path):
    comps = [C("L1H2"), C("L2H0")]
    cfg = FinetuneConfig(**{**FAST, "transfer": "auto", "retention": "auto"})
    rec = finetune(str(tiny_model_dir), comps, tmp_path / "out", config=cfg, progress=False)
    arms = rec["arms"]
    assert list(arms) == ["selective", "full", "random", "lora"]
    sel = arms["selective"]["trainable_parameters"]
    assert arms["random"]["trainable_parameters"] == sel  # same number of heads of the same size
    assert arms["full"]["trainable_parameters"] == rec["n_parameters"]
    assert abs(arms["lora"]["trainable_parameters"] - sel) / sel < 0.25  # rank chosen to match
    assert set(rec["before"]["transfer"]) == {"add 1-digit", "add 3-digit"}
    assert rec["retention"]["kind"] == "reversal" and rec["before"]["retention"] is not None
    for arm in arms.values():
        assert set(arm["delta"]) == {"target", "transfer", "retention"} and arm["loss_log"]
    assert (tmp_path / "out" / "finetune.html").stat().st_size > 10_000
    assert not (tmp_path / "out" / "checkpoint").exists()
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["arms"] == json.loads(json.dumps(arms))


# ---------------------------------------------------------------------------------------------------------
# Safety of long runs and of the user's files


@pytest.mark.slow
def test_interrupted_run_resumes_bit_identically(tiny_model_dir, tmp_path):
    comps = [C("L1H2"), C("MLP1")]
    cfg = FinetuneConfig(**{**FAST, "epochs": 2}, baselines=("random",), checkpoint_every=2)
    ref = finetune(str(tiny_model_dir), comps, tmp_path / "ref", config=cfg, progress=False)
    # 6 steps per arm: the selective arm finishes, the random arm stops after 2 of its steps
    first = finetune(str(tiny_model_dir), comps, tmp_path / "run", config=cfg, progress=False, max_steps_this_run=8)
    assert first == {"finished": False, "arm": "random", "step": 2}
    assert (tmp_path / "run" / "checkpoint").is_dir()
    with pytest.raises(ArithInterpError, match="other settings"):
        finetune(str(tiny_model_dir), comps, tmp_path / "run", config=FinetuneConfig(**FAST), progress=False)
    done = finetune(str(tiny_model_dir), comps, tmp_path / "run", config=cfg, progress=False)
    for name in ("selective", "random"):
        assert done["arms"][name]["after"] == ref["arms"][name]["after"]
        assert done["arms"][name]["loss_log"] == ref["arms"][name]["loss_log"]
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_layout_of_an_interrupted_run(tiny_model_dir, tmp_path):
    """The layout run folders of earlier versions hold, and must keep resuming from: settings.json, results.json
    and one <arm>.pt of trainable tensors per unfinished arm (not train.py's single checkpoint.pt)."""
    comps = [C("L1H2")]
    cfg = FinetuneConfig(**FAST, baselines=())  # 3 steps
    assert finetune(str(tiny_model_dir), comps, tmp_path / "run", config=cfg, progress=False,
                    max_steps_this_run=2) == {"finished": False, "arm": "selective", "step": 2}  # fmt: skip
    ckpt = tmp_path / "run" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["results.json", "selective.pt", "settings.json"]
    state = torch.load(ckpt / "selective.pt", weights_only=True)
    assert set(state) == {"params", "opt", "step", "log", "elapsed", "torch_rng"} and state["step"] == 2
    assert set(state["params"]) == set(selection_masks(load_hf(str(tiny_model_dir))[0], comps))
    assert json.loads((ckpt / "settings.json").read_text())["components"] == ["L1H2"]
    rec = finetune(str(tiny_model_dir), comps, tmp_path / "run", config=cfg, progress=False)
    assert rec["arms"]["selective"]["steps"] == 3 and not ckpt.exists()


def test_existing_output_and_input_folder_refused(tiny_model_dir, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ArithInterpError, match="not empty"):
        finetune(str(tiny_model_dir), [C("L0H0")], tmp_path / "busy", config=FinetuneConfig(**FAST), progress=False)
    with pytest.raises(ArithInterpError, match="input model"):
        finetune(str(tiny_model_dir), [C("L0H0")], tiny_model_dir, config=FinetuneConfig(**FAST), overwrite=True)


def test_config_errors_name_the_value():
    with pytest.raises(ArithInterpError, match="lr=0"):
        FinetuneConfig(lr=0)
    with pytest.raises(ArithInterpError, match="bogus"):
        FinetuneConfig(baselines=("bogus",))
    with pytest.raises(ArithInterpError, match="fulll=0.1"):
        FinetuneConfig(lr_by_arm=(("fulll", 0.1),))
    assert FinetuneConfig(lr=1e-3, lr_by_arm=(("full", 3e-4),)).lr_for("full") == 3e-4
    with pytest.raises(ArithInterpError, match="greater-than"):
        FinetuneConfig(target=TaskConfig(task="greater-than"))
    assert parse_transfer("task=sub,digits=3", TaskConfig(digits=4)) == TaskConfig(task="sub", digits=3)
    with pytest.raises(ArithInterpError, match="'size=3'"):
        parse_transfer("size=3", TaskConfig())


# ---------------------------------------------------------------------------------------------------------
# CLI


def _circuit(path: Path, names: list[str]) -> Path:
    recs = [{"name": n, "kind": C(n).kind, "layer": C(n).layer, "head": C(n).head, "score": 0.5} for n in names]
    path.write_text(json.dumps({"version": 1, "model": "tiny", "task": "add", "method": "activation",
                                "metric": "logit_diff", "select": {"how": "top-k", "k": len(names)},
                                "components": recs, "faithfulness": None, "n_total_components": 15}))  # fmt: skip
    return path


def test_cli_finetune(tiny_model_dir, tmp_path, capsys):
    circuit = _circuit(tmp_path / "circuit.json", ["L1H2", "MLP0"])
    assert [c.name for c in read_circuit(circuit)[0]] == ["L1H2", "MLP0"]
    args = ["finetune", "--model", str(tiny_model_dir), "--circuit", str(circuit), "--digits", "2", "--n-train", "32",
            "--n-eval", "8", "--epochs", "1", "--batch-size", "16", "--baselines", "random", "--heads-only",
            "--transfer", "digits=1", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "selective" in out and "random" in out and "add 1-digit" in out
    rec = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert rec["components"] == ["L1H2"] and rec["circuit"]["path"] == str(circuit)
    assert main(args) == 2  # existing output folder
    assert "not empty" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"version": 1, "components": "L1H2"}')
    assert main(args[:3] + ["--circuit", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arithinterp: error:") and "\n" not in err


# ---------------------------------------------------------------------------------------------------------
# The letter-reversal task of tiny-mixed, and exact-match scoring, against oracles


class _Oracle:
    """A stand-in causal LM that writes the correct continuation (reversal or reversed sum), except that it
    gets the answer wrong whenever `wrong(prompt)` says so."""

    def __init__(self, wrong=lambda prompt: False):
        self.wrong = wrong

    def __call__(self, seq):
        logits = torch.zeros(seq.shape[0], seq.shape[1], len(VOCAB))
        for i, row in enumerate(seq.tolist()):
            text = "".join(VOCAB[t] for t in row[1:])
            prompt, sep, done = text.partition(">") if ">" in text else text.partition("=")
            if sep == ">":
                answer = prompt[::-1]
            else:
                a, b = prompt.split("+")
                answer = str(int(a) + int(b)).zfill(len(a) + 1)[::-1]
            nxt = answer[len(done)] if len(done) < len(answer) else "<eos>"
            if self.wrong(prompt) and nxt != "<eos>":
                nxt = "z" if sep == ">" else str((int(nxt) + 1) % 10)
            logits[i, -1, VOCAB.index(nxt)] = 1.0
        return type("Out", (), {"logits": logits})()


def test_reversal_encoding_on_paper():
    seq, mask = encode_reversal(["abc", "de"])
    ids = lambda s: [VOCAB.index(c) for c in s]  # noqa: E731
    assert seq[0].tolist() == [1] + ids("abc>cba") + [2]
    assert seq[1].tolist() == [1] + ids("de>ed") + [2, 2, 2]  # padded with <eos>
    assert mask[0].tolist() == [False] * 5 + [True] * 4
    assert mask[1].tolist() == [False] * 4 + [True] * 3 + [False] * 2


def test_reversal_and_addition_exact_match_against_oracles(char_tokenizer):
    words = ["abc", "hello", "xyzzyq", "mn"]
    assert reversal_exact_match(_Oracle(), words) == 1.0
    assert reversal_exact_match(_Oracle(wrong=lambda p: p == "hello"), words) == 0.75
    from arithinterp.finetune import make_problems

    probs = make_problems(char_tokenizer, TaskConfig(task="add", digits=3), 20, seed=5)
    assert isinstance(probs, Problems) and len(probs) == 20
    assert exact_match(_Oracle(), probs) == 1.0
    texts = ["".join(VOCAB[i] for i in row[1:]) for row in probs.prompts.tolist()]
    low = lambda prompt: prompt[0] < "5"  # noqa: E731 - the oracle errs on operands a < 500
    expected = sum(not low(t) for t in texts) / len(texts)
    assert 0 < expected < 1 and exact_match(_Oracle(wrong=low), probs) == pytest.approx(expected)


def test_mixed_batches_hold_out_and_mask():
    cfg = train_default_config("mixed")
    held = set(reversal_held_out(cfg))
    seq, mask = mixed_batches(cfg)(torch.Generator().manual_seed(0))
    assert seq.shape[0] == cfg.batch_size and mask.any(1).all()
    n_add = round(cfg.batch_size * MIXED_ADD_FRACTION)
    assert all("+" in "".join(VOCAB[t] for t in row) for row in seq[:n_add].tolist())
    for row, m in zip(seq[n_add:].tolist(), mask[n_add:].tolist()):
        text = "".join(VOCAB[t] for t in row[1:] if t > 2)
        word, _, rev = text.partition(">")
        assert rev == word[::-1] and word not in held and sum(m) == len(word) + 1


def test_text_retention_is_the_language_model_loss(tiny_model_dir, tmp_path):
    from arithinterp.finetune import make_retention

    model, tok, _ = load_hf(str(tiny_model_dir))
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 10)
    ret = make_retention(str(tmp_path / "text.txt"), tok, model, n=10)
    assert (ret.kind, ret.metric, ret.higher_is_better) == ("text", "lm_loss", False)
    ids = tok.encode("the quick brown fox jumps over the lazy dog " * 10, add_special_tokens=False)
    windows = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)  # the model's 64 positions per window
    assert torch.equal(ret.windows, windows) and len(windows) == 6
    with torch.no_grad():  # mean next-token cross-entropy over all windows, worked out directly
        logits = model(windows[:, :-1]).logits
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert ret.score(model) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ArithInterpError, match="text file"):
        make_retention("reversal", _GPT2Like(), model, n=5)


class _GPT2Like:
    """A tokenizer that is not the built-in character tokenizer."""

    def get_vocab(self):
        return {"hello": 0}
