"""Can an MLP learn c_k = ĉ_k mod 10 from the running sum ĉ_k, when ĉ_k is written linearly or as a Fourier phase?

A toy of the last step `aux-mul4` misses (`benchmarks/mul4_readout.py`): the input is a d-dimensional vector of
norm about √d (like a LayerNorm's output) that holds ĉ_k of a random 4×4 problem exactly, with unit-variance noise
in every other direction, and an MLP shaped like the models' last one (d → 4d GELU → d, GPT-2's init std 0.02;
d = 256 as in the built-ins, `--d-model 768` as in Bai et al.) plus a linear read-out to the 10 digits is trained on
the cross-entropy of c_k with AdamW (lr 1e-3, batch 256), the same optimiser as the multiplication models.

* `--code linear`: ĉ_k on one direction, `scale · √d · ĉ_k` (`--scale 0.01`, d = 256: ĉ_3 = 244 lies 39 along
  it), which is how the auxiliary loss asks the model to write it;
* `--code fourier`: the phase 2π ĉ_k / 10 on two directions (cos, sin), of length √d · 0.3, the period-10 part
  of the Fourier code Bai et al. find in the ICoT model's digit representations.

`--value units` writes U_k instead (`mul4.unit_sums`: the units digits of column k's partial products plus the carry,
≡ ĉ_k mod 10 but spanning 0..~71 instead of 0..~360; what `--set aux_target=units` asks a model for).
`--value-noise SD` blurs the written value by Gaussian noise (in units of the value; labels stay exact), as far off as
a trained model's auxiliary heads read it; `--weight-decay` sets AdamW's decay.

Prints the accuracy on the 500 validation problems (`mul4.validation(0)`) every `--eval-every` steps.

    python benchmarks/mod10_toy.py --code linear --steps 30000
    python benchmarks/mod10_toy.py --code fourier --steps 6000 --eval-every 500
    python benchmarks/mod10_toy.py --code linear --steps 30000 --d-model 768     # the paper's width
    python benchmarks/mod10_toy.py --code linear --steps 260000 --eval-every 5000  # 40 min on one core
    python benchmarks/mod10_toy.py --code linear --value units --steps 40000      # U_3 instead of ĉ_3
    python benchmarks/mod10_toy.py --code linear --value units --steps 40000 --value-noise 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from arithinterp import mul4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--code", choices=("linear", "fourier"), required=True)
    p.add_argument("--value", choices=("sum", "units"), default="sum",
                   help="the number written in the code: ĉ_k ('sum', 0..~360) or U_k ('units', mul4.unit_sums: "
                        "the products' units digits plus the carry, 0..~71); c_k is it mod 10")  # fmt: skip
    p.add_argument("--value-noise", type=float, default=0.0,
                   help="standard deviation of Gaussian noise added to the written value (in its own units: how "
                        "far off a trained model's auxiliary heads read it), the label staying exact")  # fmt: skip
    p.add_argument("--k", type=int, default=3, help="output digit c_k (default 3, the one aux-mul4 misses)")
    p.add_argument("--scale", type=float, default=0.01, help="linear code: length per unit of ĉ_k, / 16")
    p.add_argument("--steps", type=int, default=30000)
    p.add_argument("--eval-every", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-model", type=int, default=256, help="width d (the MLP has 4d neurons)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW's decoupled weight decay (default 0.01, the multiplication models')")  # fmt: skip
    args = p.parse_args(argv)
    if not 0 <= args.k < mul4.N_OUT:
        sys.exit(f"mod10_toy: --k {args.k} must lie in 0..{mul4.N_OUT - 1}.")
    if args.d_model < 4:
        sys.exit(f"mod10_toy: --d-model {args.d_model} is too small; pass 4 or more (256 for the built-ins' width).")
    torch.set_num_threads(1)
    d_model, d_mlp, norm = args.d_model, 4 * args.d_model, args.d_model**0.5
    torch.manual_seed(args.seed)
    u, v = torch.linalg.qr(torch.randn(d_model, 2)).Q.T  # two orthonormal directions
    mlp = torch.nn.Sequential(torch.nn.Linear(d_model, d_mlp), torch.nn.GELU(), torch.nn.Linear(d_mlp, d_model),
                              torch.nn.Linear(d_model, 10))  # fmt: skip
    for layer in mlp:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=0.02)
            torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed + 1)
    sampler = mul4.ProblemSampler(0, 1000)

    def features(c: torch.Tensor) -> torch.Tensor:
        c = c + args.value_noise * torch.randn(len(c), generator=gen) if args.value_noise else c
        noise = torch.randn(len(c), d_model, generator=gen)
        noise = noise - (noise @ u)[:, None] * u - (noise @ v)[:, None] * v  # ĉ_k itself stays exact
        if args.code == "linear":
            return c[:, None] * args.scale * norm * u + noise
        angle = 2 * torch.pi * c / 10
        return norm * 0.3 * (torch.cos(angle)[:, None] * u + torch.sin(angle)[:, None] * v) + noise

    values = mul4.unit_sums if args.value == "units" else mul4.running_sums
    val_c = values(*mul4.validation(0))[:, args.k]
    val_x = features(val_c)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        c = values(*sampler(256, gen))[:, args.k]
        loss = F.cross_entropy(mlp(features(c)), (c % 10).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                acc = (mlp(val_x).argmax(-1) == (val_c % 10).long()).float().mean().item()
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "val_accuracy": round(acc, 3),
                              "t": round(time.time() - t0, 1)}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
