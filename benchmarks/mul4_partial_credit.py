"""How much does part of the work tell a model about an answer digit of a 4×4 product?

c_k = (s_k + carry_k) mod 10, where s_k = Σ_{i+j=k} a_i·b_j and carry_k is what the places below k carry in
(0..8 into place 1, up to 26 into place 3). A model that has learnt only s_k, or only the carry, gets the best
accuracy on c_k that any predictor from that quantity alone can get; this script measures it on random problems
(operands 1000..9999, as the multiplication tasks draw them): the Bayes predictor's accuracy, i.e. for each value
of the quantity, the share of its problems whose c_k is that value's most common digit. Chance is 0.1.

The further up the answer, the less either half is worth alone (Bai et al.'s "long-range dependency"): gradient
descent gets little signal for s_3 until the carry is there too, and none for the carry until s_3 is. This is the
c_3 stall of the stepwise-internalization runs (CHANGELOG, Known limitations).

    python benchmarks/mul4_partial_credit.py              # 2,000,000 problems, seed 0; about 10 s
"""

from __future__ import annotations

import argparse

import numpy as np


def bayes_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the best predictor of the digit y (0..9) that sees only the integer x."""
    keys, inv = np.unique(x, return_inverse=True)
    counts = np.zeros((len(keys), 10))
    np.add.at(counts, (inv, y), 1)
    return float(counts.max(1).sum() / len(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2_000_000, help="random problems (default 2,000,000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    a, b = rng.integers(1000, 10000, args.n), rng.integers(1000, 10000, args.n)
    ad = np.stack([(a // 10**i) % 10 for i in range(4)], 1)
    bd = np.stack([(b // 10**i) % 10 for i in range(4)], 1)
    product = a * b
    print(f"{args.n:,} problems, seed {args.seed}; Bayes accuracy on c_k from one quantity (chance 0.100)")
    print(" k   s_k   s_k mod 10   carry_k   (s_k, carry_k)   carry range")
    for k in range(1, 8):
        c = (product // 10**k) % 10
        s = sum(ad[:, i] * bd[:, k - i] for i in range(4) if 0 <= k - i < 4)
        below = sum(ad[:, i] * bd[:, j] * 10 ** (i + j) for i in range(4) for j in range(4) if i + j < k)
        carry = below // 10**k
        both = bayes_accuracy(s * 1000 + carry, c)
        assert both == 1.0, "c_k is a function of s_k and carry_k"  # the identity the table rests on
        print(f" {k}  {bayes_accuracy(s, c):.3f}     {bayes_accuracy(s % 10, c):.3f}      "
              f"{bayes_accuracy(carry, c):.3f}        {both:.3f}         0..{carry.max()}")  # fmt: skip


if __name__ == "__main__":
    main()
