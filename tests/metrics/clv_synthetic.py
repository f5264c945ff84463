"""Synthetic customers drawn from known BG/NBD and Gamma-Gamma parameters (the CLV tests and bench/clv_bench.py)."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import numpy as np

AS_OF = date(2026, 6, 30)
# Purchase rate λ ~ Gamma(r, rate alpha) per day, dropout after each purchase p ~ Beta(a, b);
# spend per purchase z ~ Gamma(p, rate nu) with nu ~ Gamma(q, rate v).
BG = {"r": 0.9, "alpha": 30.0, "a": 0.7, "b": 2.5}
GG = {"p": 6.0, "q": 4.0, "v": 300.0}


def synthetic_orders(n: int, seed: int, bg: dict[str, float] = BG) -> list[tuple[str, date, Decimal]]:
    """(customer, day, net) rows: each customer's first purchase 60 to 720 days before AS_OF, then the BG/NBD
    process (exponential gaps at rate λ, dropout with probability p after each repeat purchase)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, date, Decimal]] = []
    for i in range(n):
        lam = rng.gamma(bg["r"], 1 / bg["alpha"])
        p_drop = rng.beta(bg["a"], bg["b"])
        nu = rng.gamma(GG["q"], 1 / GG["v"])
        age = float(rng.integers(60, 720))
        t = 0.0
        while True:
            rows.append((f"c{i}", AS_OF - timedelta(days=age - t), Decimal(f"{rng.gamma(GG['p'], 1 / nu):.2f}")))
            if t > 0 and rng.random() < p_drop:  # BG/NBD: a customer may drop out after a repeat purchase only
                break
            t += rng.exponential(1 / lam)
            if t >= age:
                break
    return rows
