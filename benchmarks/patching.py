"""Benchmark of the patching engine.

1. Speed at parity: an all-heads, final-position activation-patching sweep (denoising, logit difference) on a
   GPT-2-small-shaped model (12 layers x 12 heads, d_model 768, random weights, the real GPT-2 tokenizer) with
   `--n` prompts of the `add` task in equation style, by arithinterp's fast engine and by
   `transformer_lens.patching.generic_activation_patch` in the same run; the ratio of the times and the
   largest difference of their normalised scores. Each engine's time includes its own clean and corrupted
   runs.
2. Attribution vs exact on tiny-add: time and Spearman rank correlation with exact final-position patching of
   node AtP and EAP-IG over all heads and MLPs (and, with `--edges`, of EAP and EAP-IG over all edges against
   exact path patching of each edge).

    python benchmarks/patching.py --out runs/bench-patching.json

Prints a table and writes every number to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from arithinterp._io import atomic_write_json
from arithinterp.attribution_patching import agreement, attribution_patch
from arithinterp.patching import Component, patch_components
from arithinterp.path_patching import patch_edges
from arithinterp.tasks import TaskConfig, filter_correct, make_dataset

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt2-tokenizer"


def gpt2_small_shaped(tokenizer_dir: Path, seed: int):
    """A default-initialised random GPT-2 small (124M parameters) with the real tokenizer, booted in memory."""
    import tempfile

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=len(tok), n_positions=64)
    hf = GPT2LMHeadModel(cfg).eval()
    folder = Path(tempfile.mkdtemp(prefix="gpt2small-"))
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    return TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tok, device="cpu").eval()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def speed(args) -> dict:
    model = gpt2_small_shaped(args.tokenizer, args.seed)
    ds = make_dataset(model.tokenizer, TaskConfig(task="add", n=args.n, style="equation", seed=args.seed))
    heads = [Component(kind="head", layer=layer, head=h) for layer in range(12) for h in range(12)]
    warm = ds.subset([0, 1])  # first-call overheads out of the timings
    patch_components(model, warm, components=heads[:2], engine="fast", progress=False)
    patch_components(model, warm, components=heads[:1], engine="transformer-lens", progress=False)
    fast, t_fast = timed(lambda: patch_components(model, ds, components=heads, engine="fast", progress=False))
    row = {"model": "gpt2-small-shaped (12x12, d_model 768, random)", "n_prompts": len(ds),
           "prompt_tokens": int(ds.clean_tokens.shape[1]), "patches": len(heads),
           "fast_s": round(t_fast, 3)}  # fmt: skip
    if not args.skip_tl:
        ref, t_tl = timed(lambda: patch_components(model, ds, components=heads, engine="transformer-lens",
                                                   progress=False))  # fmt: skip
        row.update({
            "transformer_lens_s": round(t_tl, 3), "speedup": round(t_tl / t_fast, 2),
            "max_abs_diff_normalised": float((fast.scores - ref.scores).abs().max()),
            "max_abs_diff_metric": float((fast.patched - ref.patched).abs().max()),
            "clean_minus_corrupted": float(fast.clean.mean() - fast.corrupted.mean()),
        })  # fmt: skip
    return row


def attribution_vs_exact(args) -> dict:
    from arithinterp.models import load

    model = load(args.model)
    ds = make_dataset(model.tokenizer, TaskConfig(task="add", n=args.tiny_n, seed=args.seed))
    ds = filter_correct(model, ds)
    exact, t_exact = timed(lambda: patch_components(model, ds, progress=False))
    out = {"model": args.model, "n_prompts": len(ds), "exact_s": round(t_exact, 3), "methods": {}}
    per_component = {c.name: {"exact": float(s)} for c, s in zip(exact.components, exact.scores)}
    runs = (
        ("atp", {"method": "atp"}),
        (f"eap-ig({args.ig_steps})", {"method": "eap-ig", "ig_steps": args.ig_steps}),
    )
    for label, kw in runs:
        res, t = timed(lambda kw=kw: attribution_patch(model, ds, progress=False, **kw))
        out["methods"][label] = {"time_s": round(t, 3), **_agree(res.nodes, exact)}
        for c, s in zip(res.nodes.components, res.nodes.scores):
            per_component[c.name][label] = float(s)
    # AtP linearised at the clean run instead, against exact noising patching (same sites)
    exact_noise = patch_components(model, ds, direction="noising", progress=False)
    res, t = timed(lambda: attribution_patch(model, ds, direction="noising", progress=False))
    out["methods"]["atp (noising)"] = {
        "time_s": round(t, 3),
        **_agree(res.nodes, exact_noise),
        "against": "exact noising",
    }
    out["per_component"] = per_component
    out["diagnosis"] = diagnose(model, ds)
    if args.edges:
        res, t_eap = timed(lambda: attribution_patch(model, ds, granularity="edge", position="all", progress=False))
        exact_edges, t_ex = timed(lambda: patch_edges(model, ds, res.edges.components, progress=False))
        ig, t_ig = timed(lambda: attribution_patch(model, ds, method="eap-ig", ig_steps=args.ig_steps,
                                                   granularity="edge", position="all", progress=False))  # fmt: skip
        out["edges"] = {
            "n_edges": len(res.edges.components), "exact_path_patching_s": round(t_ex, 3),
            "eap": {"time_s": round(t_eap, 3), **_agree(res.edges, exact_edges)},
            f"eap-ig({args.ig_steps})": {"time_s": round(t_ig, 3), **_agree(ig.edges, exact_edges)},
        }  # fmt: skip
    return out


def _agree(estimate, exact) -> dict:
    """`agreement`, plus Spearman over the items whose exact |effect| is at least 0.05 (the near-zero crowd
    otherwise decides much of a rank correlation by float noise)."""
    big = [i for i, e in enumerate(exact.effects) if abs(float(e)) >= 0.05]
    sub = agreement(_subset(estimate, big), _subset(exact, big))["spearman"] if len(big) > 2 else None
    return {**agreement(estimate, exact), "spearman_where_exact_ge_0.05": sub, "n_exact_ge_0.05": len(big)}


def diagnose(model, ds) -> dict:
    """Why denoising AtP disagrees: (a) where the layer-0 heads' effects go (exact path patching into the logits
    and each MLP) and (b) MLP neurons at the final position that the corrupted prompt switches off hard
    (pre-activation < -2) while the clean prompt switches them on (> 1): the gradient at the corrupted run is
    ~0 through them, so AtP cannot see effects that need them."""
    from arithinterp import _gpt2
    from arithinterp.patching import cached_runs
    from arithinterp.path_patching import path_patch

    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads = [Component(kind="head", layer=0, head=h) for h in range(n_heads)]
    routes = {}
    for rcv in ["logits"] + [f"MLP{layer}" for layer in range(n_layers)]:
        res = path_patch(model, ds, senders=heads, receivers=[rcv], progress=False)
        routes[rcv] = {c.name: round(float(s), 4) for c, s in zip(res.components, res.scores)}
    r = cached_runs(model, ds, "logit_diff", "denoising")
    w, off = r.w, {}
    with torch.no_grad():
        for layer in range(n_layers):

            def pre(cache, layer=layer):
                h = _gpt2.layer_norm(cache.resid_mid[layer][:, -1], w.ln2_w[layer], w.ln2_b[layer], w.eps)
                return h @ w.W_in[layer] + w.b_in[layer]

            c, k = pre(r.clean), pre(r.corrupted)
            off[f"MLP{layer}"] = round(float(((k < -2) & (c > 1)).float().sum(-1).mean()), 2)
    return {"layer0_heads_by_receiver": routes, "neurons_off_in_corrupted_on_in_clean": off,
            "d_mlp": int(w.W_in.shape[-1])}  # fmt: skip


def _subset(result, idx):
    from arithinterp.patching import PatchResult

    return PatchResult(components=[result.components[i] for i in idx], metric=result.metric,
                       patched=result.patched[idx], clean=result.clean, corrupted=result.corrupted)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-patching.json"), help="JSON result path.")
    p.add_argument("--n", type=int, default=32, help="Prompts for the GPT-2-small-shaped sweep.")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="GPT-2 tokenizer folder.")
    p.add_argument("--model", default="tiny-add", help="Model for attribution vs exact.")
    p.add_argument("--tiny-n", type=int, default=200, help="Prompts for attribution vs exact.")
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--edges", action="store_true", help="Also compare EAP / EAP-IG edges with exact path patching.")
    p.add_argument("--skip-tl", action="store_true", help="Skip the transformer-lens timing (slow).")
    p.add_argument("--skip-speed", action="store_true", help="Only the attribution comparison.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "python": sys.version.split()[0],
           "load_average_start": list(os.getloadavg())}  # fmt: skip
    record = {"command": "python benchmarks/patching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": env}  # fmt: skip
    if not args.skip_speed:
        record["speed"] = speed(args)
    record["attribution"] = attribution_vs_exact(args)
    env["load_average_end"] = list(os.getloadavg())
    atomic_write_json(args.out, record)

    if "speed" in record:
        s = record["speed"]
        print(
            f"\nAll-heads final-position sweep, {s['model']}, {s['n_prompts']} prompts x {s['prompt_tokens']} tokens:"
        )
        print(f"  {'engine':<18} {'time (s)':>9}")
        print(f"  {'arithinterp fast':<18} {s['fast_s']:>9.2f}")
        if "transformer_lens_s" in s:
            print(f"  {'transformer-lens':<18} {s['transformer_lens_s']:>9.2f}")
            print(
                f"  speed-up {s['speedup']:.1f}x; max |diff| normalised {s['max_abs_diff_normalised']:.2e}, "
                f"metric {s['max_abs_diff_metric']:.2e} (clean - corrupted gap {s['clean_minus_corrupted']:.3f})"
            )
    a = record["attribution"]
    print(
        f"\nAttribution vs exact patching on {a['model']} ({a['n_prompts']} prompts; exact sweep {a['exact_s']:.2f} s):"
    )
    print(f"  {'method':<14} {'time (s)':>9} {'spearman':>9} {'pearson':>8} {'rho(|exact|>=.05)':>18}")
    for name, m in a["methods"].items():
        sub = m["spearman_where_exact_ge_0.05"]
        sub_text = "-" if sub is None else f"{sub:.3f} (n={m['n_exact_ge_0.05']})"
        print(f"  {name:<14} {m['time_s']:>9.2f} {m['spearman']:>9.3f} {m['pearson']:>8.3f} {sub_text:>18}")
    print(f"\n  {'component':<9} " + " ".join(f"{k:>10}" for k in next(iter(a["per_component"].values()))))
    for name, vals in a["per_component"].items():
        print(f"  {name:<9} " + " ".join(f"{v:>10.3f}" for v in vals.values()))
    d = a["diagnosis"]
    print("\n  layer-0 heads, exact path patching by receiver:")
    for rcv, scores in d["layer0_heads_by_receiver"].items():
        print(f"    -> {rcv:<7} " + "  ".join(f"{k} {v:6.3f}" for k, v in scores.items()))
    print(
        f"  MLP neurons (of {d['d_mlp']}) off in corrupted (<-2), on in clean (>1), final position: "
        + ", ".join(f"{k} {v}" for k, v in d["neurons_off_in_corrupted_on_in_clean"].items())
    )
    if "edges" in a:
        e = a["edges"]
        print(f"\nEdges ({e['n_edges']}), exact path patching {e['exact_path_patching_s']:.2f} s:")
        for name in [k for k in e if k not in ("n_edges", "exact_path_patching_s")]:
            sub = e[name]["spearman_where_exact_ge_0.05"]
            print(
                f"  {name:<12} {e[name]['time_s']:>9.2f} s  spearman {e[name]['spearman']:.3f}  "
                f"pearson {e[name]['pearson']:.3f}  spearman where |exact| >= 0.05: "
                f"{'-' if sub is None else f'{sub:.3f}'} (n={e[name]['n_exact_ge_0.05']})"
            )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
