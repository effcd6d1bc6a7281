"""Selective fine-tuning: train only a circuit's attention heads (and MLPs); everything else stays frozen.

Zhang et al. (ICML 2024) tuned only the query/key/value/output weights of the few heads that carry arithmetic
and gained more on arithmetic than full fine-tuning, while keeping the model's other abilities. `finetune`
runs that experiment on any GPT-2- or LLaMA-style Hugging Face model: the selective arm and, in the same run,
the baselines it must beat - full fine-tuning, the same number of randomly chosen heads (and MLPs), and LoRA
at a comparable number of trainable parameters - each evaluated before and after on held-out problems of the
trained distribution, on transfer distributions, and on a non-arithmetic ability (retention).

How only the selection trains. Every parameter is frozen (`requires_grad=False`) except those holding a
selected slice; a gradient hook zeroes the gradient outside the slice. With Adam or SGD and no weight decay an
entry whose gradient is always zero never moves (Adam's update is `0 / (0 + eps) = 0`), so every parameter
outside the selection stays bit-identical to the input model's (tested). Weight decay, when asked for, is
applied by hand to the selected entries only - AdamW's built-in decay would shrink the frozen ones too.

A head's slice (the entries of the weights it owns, in GPT-2- and LLaMA-style layouts) is defined in
`arithinterp.param_slices`.

Safety: the input model is only read; the output folder gets the selectively tuned model (an ordinary Hugging
Face folder, float32), `finetune.json` and `finetune.html`. Training state is checkpointed atomically under
`<out>/checkpoint/` and a run started again with the same settings resumes where it stopped (bit-identically).
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm

from arithinterp._errors import ArithInterpError
from arithinterp._io import atomic_write_bytes, atomic_write_json, prepare_out_dir
from arithinterp.circuit import Circuit
from arithinterp.models import load_hf
from arithinterp.param_slices import Layout, check_components, kv_groups, layout, random_components, selection_masks
from arithinterp.patching import Component
from arithinterp.tasks import OPS, STYLES, TaskConfig, make_dataset
from arithinterp.tokenizer import is_char_tokenizer

ARMS = ("selective", "full", "random", "lora")
Optimizer = Literal["adam", "sgd"]
GradScale = Literal["none", "heads"]
BASELINES = ARMS[1:]
EVAL_SEED = -1  # evaluation problems are the same for every seed and arm (training seeds are >= 0); disjoint


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """The experiment: what to train on, how, which arms, and how to evaluate."""

    target: TaskConfig = TaskConfig(task="add", digits=2)  # the trained distribution (n, seed are set below)
    transfer: tuple[TaskConfig, ...] | Literal["auto"] = "auto"  # auto: digits +-1, or the other two styles
    n_train: int = 4000  # training problems (distinct from every evaluation problem)
    n_eval: int = 300  # held-out problems per distribution, and retention examples
    epochs: int = 4
    batch_size: int = 32
    lr: float = 3e-4
    lr_by_arm: tuple[tuple[str, float], ...] = ()  # per-arm learning rates, e.g. (("full", 3e-4),); others: lr
    optimizer: Optimizer = "adam"
    weight_decay: float = 0.0  # decoupled, applied to the trainable entries only
    grad_scale: GradScale = "none"  # heads: x (total heads / selected heads), see _grad_factor
    max_grad_norm: float = 1.0  # 0 disables clipping
    include_mlps: bool = True  # train the circuit's MLPs too (False: its heads only)
    baselines: tuple[str, ...] = BASELINES
    retention: str = "auto"  # auto | reversal | none | path of a text file (language-model loss)
    seed: int = 0  # training data, data order, random heads, LoRA initialisation
    checkpoint_every: int = 50  # optimiser steps between checkpoints
    save_baselines: bool = False  # also save each baseline's model under <out>/arms/<arm>/

    def __post_init__(self) -> None:
        if self.target.task not in OPS:
            raise ArithInterpError(f"task {self.target.task!r} cannot be fine-tuned on; choose {', '.join(OPS)}.")
        if self.seed < 0:
            raise ArithInterpError(f"seed={self.seed} must be >= 0 (negative seeds are the evaluation sets').")
        for name in ("n_train", "n_eval", "epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ArithInterpError(f"{name}={getattr(self, name)} must be >= 1.")
        if not self.lr > 0:
            raise ArithInterpError(f"lr={self.lr} must be > 0 (e.g. --lr 1e-3).")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ArithInterpError("weight_decay and max_grad_norm must be >= 0.")
        if self.optimizer not in get_args(Optimizer):
            raise ArithInterpError(f"optimizer {self.optimizer!r} is unknown; choose adam or sgd.")
        if self.grad_scale not in get_args(GradScale):
            raise ArithInterpError(f"grad_scale {self.grad_scale!r} is unknown; choose none or heads.")
        for arm, lr in self.lr_by_arm:
            if arm not in ARMS or not lr > 0:
                raise ArithInterpError(f"lr_by_arm entry {arm}={lr}: name an arm ({', '.join(ARMS)}) and a rate > 0.")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ArithInterpError(f"unknown baseline(s) {', '.join(bad)}; choose from {', '.join(BASELINES)}.")
        if self.retention not in ("auto", "reversal", "none") and not Path(self.retention).is_file():
            raise ArithInterpError(
                f"retention {self.retention!r} is neither auto, reversal, none nor an existing text file; "
                "pass a text file for the language-model loss, or none."
            )

    def lr_for(self, arm: str) -> float:
        return dict(self.lr_by_arm).get(arm, self.lr)

    @property
    def arms(self) -> tuple[str, ...]:
        return ("selective",) + tuple(b for b in BASELINES if b in self.baselines)

    def transfer_configs(self, style: str) -> tuple[TaskConfig, ...]:
        """The transfer distributions; "auto" gives operands one digit shorter and longer (digit style) or the
        other two template styles."""
        if self.transfer != "auto":
            return tuple(self.transfer)
        if style == "digits":
            return tuple(replace(self.target, digits=d) for d in (self.target.digits - 1, self.target.digits + 1)
                         if 1 <= d <= 12)  # fmt: skip
        return tuple(replace(self.target, style=s) for s in STYLES[1:] if s != style)


def parse_transfer(text: str, target: TaskConfig) -> TaskConfig:
    """A transfer distribution written as changes to the target: "digits=3", "task=sub,digits=3",
    "style=question", "range=10-99"."""
    changes: dict[str, Any] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = part.partition("=")
        try:
            if key == "digits":
                changes["digits"] = int(value)
            elif key in ("task", "style"):
                changes[key] = value
            elif key == "range":
                lo, hi = value.split("-")
                changes["operand_range"] = (int(lo), int(hi))
            else:
                raise ValueError(key)
        except ValueError:
            raise ArithInterpError(
                f"transfer {text!r}: cannot read {part!r}; write changes to the target like 'digits=3', "
                "'task=sub', 'style=question' or 'range=10-99', separated by commas."
            ) from None
    if not changes:
        raise ArithInterpError(f"transfer {text!r} changes nothing; write e.g. 'digits=3' or 'task=sub'.")
    return replace(target, **changes)


# ---------------------------------------------------------------------------------------------------------
# Circuits


def read_circuit(path: str | Path) -> tuple[list[Component], dict[str, Any]]:
    """The components of a circuit.json and its model, task, method, selection and faithfulness."""
    c = Circuit.load(path)
    return list(c.components), {"model": c.model, "task": c.task, "method": c.method, "select": c.select,
                                "faithfulness": c.faithfulness}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Data and evaluation


@dataclass(frozen=True, kw_only=True)
class Problems:
    """Tokenised problems of one distribution: prompts (one token length, BOS first) and answer token ids."""

    name: str
    config: TaskConfig
    prompts: Int[Tensor, "batch pos"]
    answers: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.answers)


def distribution_name(tc: TaskConfig, style: str) -> str:
    if (tc.style or style) == "digits":
        return f"{tc.task} {tc.digits}-digit"
    rng = f" {tc.operand_range[0]}-{tc.operand_range[1]}" if tc.operand_range else ""
    return f"{tc.task} {tc.style or style}{rng}"


def make_problems(tokenizer, tc: TaskConfig, n: int, seed: int, *, exclude: Sequence[Problems] = ()) -> Problems:
    """`n` problems of `tc` drawn with `seed`; prompts also in `exclude` are dropped (train/test separation)."""
    from arithinterp.tasks import _answer_token_ids, default_style

    style = tc.style or default_style(tokenizer)
    taken = {tuple(p.tolist()) for ex in exclude for p in ex.prompts}
    ds = make_dataset(tokenizer, replace(tc, n=n + len(taken) // 4 + 8 if taken else n, seed=seed, answer_token=0))
    keep = [i for i, p in enumerate(ds.clean_tokens.tolist()) if tuple(p) not in taken][:n]
    if not keep:
        raise ArithInterpError(
            f"every {distribution_name(tc, style)} training problem is also an evaluation problem; widen the "
            "operand range or raise --digits."
        )
    answers = [tuple(_answer_token_ids(tokenizer, ds.examples[i].clean, ds.examples[i].full_answer)) for i in keep]
    return Problems(name=distribution_name(tc, style), config=tc, prompts=ds.clean_tokens[keep], answers=answers)


def training_tensors(problems: Problems, eos: int | None) -> tuple[Int[Tensor, "batch seq"], Bool[Tensor, "batch seq"]]:
    """Prompt + answer (+ <eos> when given) per problem, right-padded with <eos>; mask = the tokens to predict."""
    pad = eos if eos is not None else 0
    tail = [eos] if eos is not None else []
    rows = [p.tolist() + list(a) + tail for p, a in zip(problems.prompts, problems.answers)]
    width = max(len(r) for r in rows)
    seq = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    start = problems.prompts.shape[1]
    for i, r in enumerate(rows):
        seq[i, : len(r)] = torch.tensor(r)
        mask[i, start : len(r)] = True
    return seq, mask


@torch.no_grad()
def exact_match(model, problems: Problems, batch_size: int = 256) -> float:
    """Fraction of problems whose whole answer the model writes greedily."""
    from arithinterp.train import greedy_answers

    by_len: dict[int, list[int]] = {}
    for i, a in enumerate(problems.answers):
        by_len.setdefault(len(a), []).append(i)
    correct = 0
    for n_tok, idx in by_len.items():
        pred = greedy_answers(model, problems.prompts[idx], n_tok, batch_size=batch_size)
        correct += int((pred == torch.tensor([problems.answers[i] for i in idx])).all(1).sum())
    return correct / len(problems)


@dataclass(frozen=True, kw_only=True)
class Retention:
    """The non-arithmetic ability: letter-reversal exact match (built-in models) or LM loss on a text file."""

    kind: Literal["reversal", "text", "none"]
    metric: str  # "exact_match" (higher is better) or "lm_loss" (lower is better)
    source: str = ""
    words: tuple[str, ...] = ()
    windows: Int[Tensor, "window pos"] | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "lm_loss"

    def describe(self) -> dict[str, Any]:
        n = len(self.words) if self.kind == "reversal" else (0 if self.windows is None else int(self.windows.numel()))
        return {"kind": self.kind, "metric": self.metric, "source": self.source, "n": n,
                "higher_is_better": self.higher_is_better}  # fmt: skip

    @torch.no_grad()
    def score(self, model) -> float | None:
        if self.kind == "none":
            return None
        if self.kind == "reversal":
            from arithinterp.train import reversal_exact_match

            return reversal_exact_match(model, list(self.words))
        total, count = 0.0, 0
        for chunk in self.windows.split(16):
            logits = model(chunk[:, :-1]).logits
            total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
        return total / count


def make_retention(spec: str, tokenizer, model, n: int, max_tokens: int = 32_768) -> Retention:
    """`auto`: letter reversal for the built-in character-level models, none otherwise."""
    if spec == "auto":
        spec = "reversal" if is_char_tokenizer(tokenizer) else "none"
    if spec == "none":
        return Retention(kind="none", metric="none")
    if spec == "reversal":
        if not is_char_tokenizer(tokenizer):
            raise ArithInterpError(
                "retention 'reversal' is the letter task of the built-in models; for this model pass a text file "
                "(--retention FILE) to measure language-model loss, or --retention none."
            )
        from arithinterp.train import default_config, reversal_held_out

        return Retention(kind="reversal", metric="exact_match", source="tiny-mixed held-out reversal",
                         words=tuple(reversal_held_out(default_config("mixed"))[:n]))  # fmt: skip
    ids = tokenizer.encode(Path(spec).read_text(), add_special_tokens=False)[:max_tokens]
    width = min(256, int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings))
    if len(ids) < width:
        raise ArithInterpError(f"retention text {spec!r} has {len(ids)} tokens; pass a text of >= {width} tokens.")
    windows = torch.tensor(ids[: len(ids) // width * width]).view(-1, width)  # (window, pos)
    return Retention(kind="text", metric="lm_loss", source=str(spec), windows=windows)


# ---------------------------------------------------------------------------------------------------------
# One arm


@dataclass(kw_only=True)
class Arm:
    """A model prepared for one arm: its trainable parameters and the gradient masks that confine them."""

    name: str
    model: Any
    masks: dict[str, Tensor] = field(default_factory=dict)  # partial parameters only
    components: list[Component] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    hooks: list = field(default_factory=list)

    def trainable(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def n_trainable(self) -> int:
        return sum(int(self.masks[n].sum()) if n in self.masks else p.numel() for n, p in self.trainable().items())


def _grad_factor(cfg: FinetuneConfig, components: Sequence[Component], lay: Layout) -> float:
    """`grad_scale="heads"` multiplies the selection's gradients by total heads / selected heads. Adam is
    nearly invariant to a constant factor (it acts through eps and clipping); with SGD it scales the step."""
    n_sel = sum(c.kind == "head" for c in components)
    return lay.n_layers * lay.n_heads / n_sel if cfg.grad_scale == "heads" and n_sel else 1.0


def prepare_arm(name: str, model, components: Sequence[Component], cfg: FinetuneConfig, target_params: int,
                lay: Layout) -> Arm:  # fmt: skip
    """Freeze `model` except what arm `name` trains; LoRA wraps the model (peft) at ~`target_params`.

    `lay` is `layout(model)`: every arm's model is a copy of the input model, so the caller works it out once.
    """
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Arm(name=name, model=model)
    for p in model.parameters():
        p.requires_grad_(False)
    if name == "lora":
        return _lora_arm(model, components, cfg, target_params, lay)
    comps = list(components) if name == "selective" else random_components(components, lay, cfg.seed)
    masks = selection_masks(model, comps)
    factor = _grad_factor(cfg, comps, lay)
    params = dict(model.named_parameters())
    arm = Arm(name=name, model=model, components=comps)
    for pname, mask in masks.items():
        p = params[pname]
        p.requires_grad_(True)
        if bool(mask.all()):
            if factor != 1.0:
                arm.hooks.append(p.register_hook(lambda g, f=factor: g * f))
        else:
            arm.masks[pname] = mask
            # torch.where, not g * mask: a non-finite gradient outside the slice must not leak in as NaN
            arm.hooks.append(p.register_hook(lambda g, m=mask, f=factor: torch.where(m, g * f, torch.zeros_like(g))))
    if lay.kind == "llama" and lay.group_size > 1:
        arm.info["kv_groups"] = kv_groups(comps, lay)
        arm.info["kv_note"] = (
            f"grouped-query attention: {lay.group_size} heads share each key/value head, so each selected "
            "head's group K/V slice is trained (shared with the group's other heads)"
        )
    arm.info["grad_factor"] = factor
    return arm


def _lora_arm(model, components: Sequence[Component], cfg: FinetuneConfig, target_params: int, lay: Layout) -> Arm:
    from peft import LoraConfig, get_peft_model

    with_mlp = any(c.kind == "mlp" for c in components)
    if lay.kind == "gpt2":
        pattern = r".*\.attn\.(c_attn|c_proj)" + (r"|.*\.mlp\.(c_fc|c_proj)" if with_mlp else "")
        per_rank = sum(sum(m.weight.shape) for n, m in model.named_modules() if _fullmatch(pattern, n))
    else:
        names = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"] if with_mlp else [])
        pattern = r".*\.(" + "|".join(names) + ")"
        per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules() if _fullmatch(pattern, n))
    rank = max(1, round(target_params / per_rank))
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=pattern, bias="none",
                      fan_in_fan_out=lay.kind == "gpt2")  # fmt: skip
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5; nothing to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, lora)
    return Arm(name="lora", model=wrapped, info={"rank": rank, "alpha": 2 * rank, "target_modules": pattern})


def _fullmatch(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(pattern, name) is not None


def _make_optimizer(arm: Arm, cfg: FinetuneConfig):
    params, lr = list(arm.trainable().values()), cfg.lr_for(arm.name)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0)
    return torch.optim.Adam(params, lr=lr, weight_decay=0.0)  # decay is applied by hand, masked


def train_arm(arm: Arm, seq: Tensor, mask: Tensor, cfg: FinetuneConfig, ckpt: Path, *, progress: bool = True,
              budget: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train one arm for `cfg.epochs` epochs over (`seq`, `mask`), checkpointing to `ckpt`; resumes from it.

    Returns {"done", "steps", "train_time_s", "log"}. `budget` ([steps left]) stops early with a checkpoint
    saved (an interruption, for tests and for runs split across sessions).
    """
    n = seq.shape[0]
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    trainable = arm.trainable()
    opt = _make_optimizer(arm, cfg)
    step, log, elapsed = 0, [], 0.0
    torch.manual_seed(cfg.seed)
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        with torch.no_grad():
            for name, value in state["params"].items():
                trainable[name].copy_(value)
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["torch_rng"])
        step, log, elapsed = state["step"], state["log"], state["elapsed"]
    arm.model.train()
    t0 = time.time() - elapsed
    bar = tqdm(total=total, initial=step, desc=f"finetune {arm.name}", disable=not progress)
    perm = None
    while step < total:
        if budget is not None and budget[0] <= 0:
            break
        epoch, k = divmod(step, per_epoch)
        if perm is None or k == 0:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = perm[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        x, m = seq[idx], mask[idx]
        logits = arm.model(x[:, :-1]).logits  # (batch, seq - 1, d_vocab)
        loss = F.cross_entropy(logits[m[:, 1:]], x[:, 1:][m[:, 1:]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
        if cfg.weight_decay > 0:
            with torch.no_grad():
                for name, p in trainable.items():
                    shrink = cfg.lr_for(arm.name) * cfg.weight_decay
                    p.mul_(1 - shrink * arm.masks[name]) if name in arm.masks else p.mul_(1 - shrink)
        opt.step()
        step += 1
        bar.update(1)
        if budget is not None:
            budget[0] -= 1
        if step % 10 == 0 or step == total:
            log.append({"step": step, "epoch": epoch, "loss": round(loss.item(), 5)})
            bar.set_postfix(loss=log[-1]["loss"])
        if step % cfg.checkpoint_every == 0 or step == total or (budget is not None and budget[0] <= 0):
            _save_arm(ckpt, trainable, opt, step, log, time.time() - t0)
    bar.close()
    arm.model.eval()
    return {"done": step >= total, "steps": step, "train_time_s": round(time.time() - t0, 2), "log": log}


def _save_arm(path: Path, trainable: dict[str, Tensor], opt, step: int, log: list, elapsed: float) -> None:
    # Not train.save_checkpoint, which writes one checkpoint.pt of whole state dicts: a finetune run keeps one
    # <arm>.pt per arm holding the trainable tensors only, and run folders in that layout must keep resuming.
    buf = io.BytesIO()
    torch.save({"params": {n: p.detach().clone() for n, p in trainable.items()}, "opt": opt.state_dict(),
                "step": step, "log": log, "elapsed": elapsed, "torch_rng": torch.get_rng_state()}, buf)  # fmt: skip
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# The experiment


def _evaluate(model, target: Problems, transfer: list[Problems], retention: Retention) -> dict[str, Any]:
    return {"target": exact_match(model, target), "transfer": {p.name: exact_match(model, p) for p in transfer},
            "retention": retention.score(model)}  # fmt: skip


def _delta(after: dict, before: dict) -> dict[str, Any]:
    sub = lambda a, b: None if a is None or b is None else a - b  # noqa: E731
    return {"target": sub(after["target"], before["target"]),
            "transfer": {k: sub(v, before["transfer"][k]) for k, v in after["transfer"].items()},
            "retention": sub(after["retention"], before["retention"])}  # fmt: skip


def _settings(model_spec: str, components: Sequence[Component], cfg: FinetuneConfig) -> dict[str, Any]:
    return {"model": model_spec, "components": [c.name for c in components], "config": asdict(cfg)}


def finetune(
    model_spec: str,
    components: Sequence[Component | str],
    out: str | Path,
    *,
    config: FinetuneConfig = FinetuneConfig(),
    circuit_info: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_steps_this_run: int | None = None,
) -> dict[str, Any]:
    """Run every arm of `config` on `model_spec` and write the selective model, finetune.json and finetune.html.

    Returns the finetune.json record, or {"finished": False, ...} when `max_steps_this_run` stopped it first
    (calling again with the same arguments resumes).
    """
    from arithinterp import __version__
    from arithinterp.models import resolve
    from arithinterp.train import _write_model_folder

    cfg = config
    comps = [c if isinstance(c, Component) else Component.parse(str(c)) for c in components]
    if not cfg.include_mlps:
        comps = [c for c in comps if c.kind == "head"]
    if not comps:
        raise ArithInterpError("the circuit selects no components (no heads, or no MLPs with --heads-only); "
                               "localize with a larger selection.")  # fmt: skip
    out = Path(out)
    _, location = resolve(model_spec)
    if Path(location).exists() and out.resolve() == Path(location).resolve():
        raise ArithInterpError(f"--out {str(out)!r} is the input model's folder; pass another folder (the input "
                               "model is never modified).")  # fmt: skip
    ckpt_dir = out / "checkpoint"
    settings = _settings(model_spec, comps, cfg)
    # settings.json, not an arm's .pt, marks a run to resume (train.open_run keys on its checkpoint.pt): a run
    # stopped between arms holds only settings.json and results.json.
    resuming = (ckpt_dir / "settings.json").is_file()
    if resuming:
        if json.loads((ckpt_dir / "settings.json").read_text()) != json.loads(json.dumps(settings)):
            raise ArithInterpError(f"{str(out)!r} holds an unfinished run with other settings; pass the same "
                                   "settings to resume it, or another --out.")  # fmt: skip
    else:
        prepare_out_dir(out, overwrite=overwrite)
        atomic_write_json(ckpt_dir / "settings.json", settings)
    t_start = time.time()
    model, tokenizer, _ = load_hf(model_spec)
    lay = layout(model)
    check_components(comps, lay)
    from arithinterp.tasks import default_style

    style = cfg.target.style or default_style(tokenizer)
    target = make_problems(tokenizer, cfg.target, cfg.n_eval, EVAL_SEED)
    transfer = [make_problems(tokenizer, tc, cfg.n_eval, EVAL_SEED) for tc in cfg.transfer_configs(style)]
    train_set = make_problems(tokenizer, cfg.target, cfg.n_train, cfg.seed, exclude=[target])
    eos = tokenizer.eos_token_id if is_char_tokenizer(tokenizer) else None
    seq, mask = training_tensors(train_set, eos)
    n_pos = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
    if seq.shape[1] > n_pos:
        raise ArithInterpError(f"problems of {target.name} are {seq.shape[1]} tokens, longer than the model's "
                               f"{n_pos} positions; use fewer --digits.")  # fmt: skip
    retention = make_retention(cfg.retention, tokenizer, model, cfg.n_eval)
    n_params = sum(p.numel() for p in model.parameters())
    selective_params = sum(int(m.sum()) for m in selection_masks(model, comps).values())

    state_path = ckpt_dir / "results.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"arms": {}}
    if "before" not in state:
        state["before"] = _evaluate(model, target, transfer, retention)
        atomic_write_json(state_path, state)
    budget = None if max_steps_this_run is None else [max_steps_this_run]
    for name in cfg.arms:
        if name in state["arms"]:
            continue  # finished in an earlier, interrupted run
        arm_model = model if name == "selective" else load_hf(model_spec)[0]  # a fresh copy of the input
        arm = prepare_arm(name, arm_model, comps, cfg, selective_params, lay)
        run = train_arm(arm, seq, mask, cfg, ckpt_dir / f"{name}.pt", progress=progress, budget=budget)
        for h in arm.hooks:
            h.remove()
        if not run["done"]:
            return {"finished": False, "arm": name, "step": run["steps"]}
        n_trainable = arm.n_trainable()
        if name == "lora":
            arm.model = arm.model.merge_and_unload()  # same function, plain forward passes (faster to evaluate)
        t_eval = time.time()
        after = _evaluate(arm.model, target, transfer, retention)
        state["arms"][name] = {
            "components": [c.name for c in arm.components], "lr": cfg.lr_for(name), "trainable_parameters": n_trainable,
            "trainable_fraction": n_trainable / n_params, "train_time_s": run["train_time_s"],
            "eval_time_s": round(time.time() - t_eval, 2), "steps": run["steps"], "after": after,
            "delta": _delta(after, state["before"]), "loss_log": run["log"], **arm.info,
        }  # fmt: skip
        if name == "selective":
            _write_model_folder(out, arm.model, tokenizer)
        elif cfg.save_baselines:
            _write_model_folder(out / "arms" / name, arm.model, tokenizer)
        atomic_write_json(state_path, state)
        (ckpt_dir / f"{name}.pt").unlink(missing_ok=True)
        del arm, arm_model
    record = {
        "version": __version__, "model": model_spec, "task": cfg.target.task, "method": "selective-finetune",
        "seed": cfg.seed, "circuit": circuit_info or {}, "components": [c.name for c in comps],
        "settings": asdict(cfg), "layout": asdict(lay), "n_parameters": n_params,
        "data": {"target": target.name, "transfer": [p.name for p in transfer], "n_train": len(train_set),
                 "n_eval": cfg.n_eval, "eval_seed": EVAL_SEED, "style": style},
        "retention": retention.describe(), "before": state["before"], "arms": state["arms"],
        "output_model": str(out), "wall_time_s": round(time.time() - t_start, 2),
    }  # fmt: skip
    atomic_write_json(out / "finetune.json", record)
    from arithinterp.plots import finetune_figures, write_html

    title = f"Selective fine-tuning: {model_spec} on {target.name} (seed {cfg.seed})"
    write_html(out / "finetune.html", finetune_figures(record), title=title, header=_html_header(record))
    for f in ckpt_dir.iterdir():
        f.unlink()
    ckpt_dir.rmdir()
    return record


def _html_header(record: dict[str, Any]) -> str:
    ret = record["retention"]
    better = "higher" if ret["higher_is_better"] else "lower"
    return (f"<p>Arms: {', '.join(record['arms'])}. Selected: {', '.join(record['components'])}. Accuracy is exact "
            f"match on {record['settings']['n_eval']} held-out problems per distribution; retention is "
            f"{ret['kind']} ({ret['metric']}, {better} is better). Before: target {record['before']['target']:.3f}."
            "</p>")  # fmt: skip
