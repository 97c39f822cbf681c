"""Small exact statistics for the comparison: Wilson intervals and the exact McNemar (sign) test.

A success rate from n held-out episodes is a binomial proportion; with n ~ 100 and rates near 0 the
normal ("Wald") interval p +- z sqrt(p(1-p)/n) is wrong (zero width at 0/n, bounds outside [0, 1]),
so every rate gets the Wilson score interval instead (Wilson 1927; Newcombe 1998, "Two-sided
confidence intervals for the single proportion", method 3). Two policies evaluated on the SAME games
are compared pairwise: only the games where exactly one of them won carry information, and under
"no difference" each such game is a fair coin, so the exact two-sided McNemar test is a binomial
(sign) test on the discordant counts (McNemar 1947; Agresti, "Categorical Data Analysis", 10.1).

Everything is computed in plain Python: the binomial tail with integers (exact, any n), the interval
in float64. `pooled_success` and `paired_over_seeds` apply the two to per-seed outcome dicts
({seed: {game: won}}): episodes are pooled over seeds, the per-seed values are kept beside them.
"""

from __future__ import annotations

import math
from fractions import Fraction

Z95 = 1.959963984540054
"""The standard normal 0.975 quantile: a two-sided 95% interval."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (low, high) for `successes` out of `n` Bernoulli trials.

    The bounds are the two roots p of (p_hat - p)^2 = z^2 p (1 - p) / n, i.e.
        center = (p_hat + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p_hat (1 - p_hat) / n + z^2 / (4 n^2))
    (no continuity correction). At 0/n the low bound is exactly 0 and at n/n the high bound exactly 1
    (set explicitly: the float formula leaves a ~1e-17 residue there). n = 0 raises ValueError: zero
    episodes carry no information, and a (0, 1) "interval" would read like a measurement.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: need n > 0 trials, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes={successes} outside [0, n={n}]")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b (A won, B lost) and c (A lost, B won).

    Under H0 each of the b + c discordant pairs goes either way with probability 1/2, so
        p = min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)]) = min(1, 2 * sum_{k<=min(b,c)} C(b+c, k) / 2^(b+c)).
    Summed in integers and divided once (exact for any b + c). b = c = 0 (no discordant pair): p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got b={b}, c={c}")
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def paired_outcomes(a: dict[str, bool], b: dict[str, bool]) -> dict:
    """Paired comparison of two policies' outcomes on the same games ({game: won}).

    Returns {"wins": A won and B lost, "losses": A lost and B won, "ties_success": both won,
    "ties_fail": both lost, "n": games, "p": mcnemar_exact(wins, losses)}. Both sides must cover
    exactly the same games: a game missing on either side raises ValueError naming it (a silently
    dropped game would bias the pairing).
    """
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(
            f"paired_outcomes: the two sides evaluated different games: only in A {only_a[:5]}"
            f"{' ...' if len(only_a) > 5 else ''} ({len(only_a)}), only in B {only_b[:5]}"
            f"{' ...' if len(only_b) > 5 else ''} ({len(only_b)})"
        )
    wins = sum(1 for g in a if a[g] and not b[g])
    losses = sum(1 for g in a if b[g] and not a[g])
    ties_success = sum(1 for g in a if a[g] and b[g])
    ties_fail = len(a) - wins - losses - ties_success
    return {
        "wins": wins,
        "losses": losses,
        "ties_success": ties_success,
        "ties_fail": ties_fail,
        "n": len(a),
        "p": mcnemar_exact(wins, losses),
    }


def pooled_success(by_seed: dict[int, dict[str, bool]], z: float = Z95) -> dict:
    """Success over seeds ({seed: {game: won}}): episodes pooled over seeds, plus per-seed values.

    Returns {"successes", "episodes", "rate", "ci95": [low, high] (Wilson on the pooled episodes),
    "per_seed": {seed: {"successes", "episodes", "rate"}}}. Raises ValueError with no episodes.
    Pooling treats every (seed, game) episode as one trial: seeds are independent training runs, but
    they share the eval games, so the interval covers episode noise, not game-sampling noise alone.
    """
    per_seed = {}
    for seed, outcomes in by_seed.items():
        k, n = sum(bool(w) for w in outcomes.values()), len(outcomes)
        per_seed[seed] = {"successes": k, "episodes": n, "rate": k / n if n else None}
    k = sum(s["successes"] for s in per_seed.values())
    n = sum(s["episodes"] for s in per_seed.values())
    low, high = wilson_interval(k, n, z)
    return {"successes": k, "episodes": n, "rate": k / n, "ci95": [low, high], "per_seed": per_seed}


def paired_over_seeds(a_by_seed: dict[int, dict[str, bool]], b_by_seed: dict[int, dict[str, bool]]) -> dict:
    """`paired_outcomes` of A vs B per seed (A's seed-s run against B's seed-s run), pooled over seeds.

    Returns the pooled counts with the exact McNemar p of the pooled discordant counts, and
    "per_seed": {seed: paired_outcomes(...)}. Every seed of A needs B's same seed (ValueError naming
    it); B's extra seeds are not used (e.g. a baseline evaluated for one seed only is paired there).
    """
    missing = sorted(set(a_by_seed) - set(b_by_seed))
    if missing:
        raise ValueError(f"paired_over_seeds: no B outcomes for seeds {missing}")
    per_seed = {s: paired_outcomes(a_by_seed[s], b_by_seed[s]) for s in a_by_seed}
    keys = ("wins", "losses", "ties_success", "ties_fail", "n")
    out = {k: sum(r[k] for r in per_seed.values()) for k in keys}
    out["p"] = mcnemar_exact(out["wins"], out["losses"])
    out["per_seed"] = per_seed
    return out
