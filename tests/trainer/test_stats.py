"""trainer/stats.py on hand-computed fixtures: Wilson score intervals (closed forms, the published
table of Newcombe 1998, the score equation the bounds solve), the exact McNemar / sign test, the
paired outcome counts and the pooling over seeds; against scipy when it is installed."""

import math

import pytest

from singleturn.trainer.stats import (
    Z95,
    mcnemar_exact,
    paired_outcomes,
    paired_over_seeds,
    pooled_success,
    wilson_interval,
)

Z2 = Z95 * Z95  # 3.841458820694124


def _close(got, want, tol=1e-12):
    assert abs(got - want) <= tol, f"got {got!r}, want {want!r} (|diff| {abs(got - want):.3g} > {tol})"


def test_wilson_closed_forms():
    # 0/n: p_hat = 0, so center = half = (z^2 / 2n) / (1 + z^2/n): low = 0, high = z^2 / (n + z^2).
    # 0/20: 3.841458820694124 / 23.841458820694124 = 0.1611251580528194.
    assert wilson_interval(0, 20) == (0.0, pytest.approx(0.1611251580528194, abs=1e-15))
    _close(wilson_interval(0, 20)[1], Z2 / (20 + Z2))
    # n/n mirrors it: low = n / (n + z^2) = 20 / 23.841458820694124 = 0.8388748419471806, high = 1.
    low, high = wilson_interval(20, 20)
    assert high == 1.0
    _close(low, 0.8388748419471806)
    # 50/100: center = 0.5; half = z / (1 + z^2/100) * sqrt(0.25/100 + z^2/40000)
    #   = 1.959963984540054 / 1.0384145882069412 * sqrt(0.0025 + 0.0000960364705173531)
    #   = 1.887449... * 0.0509937... = 0.0961684696340044.
    low, high = wilson_interval(50, 100)
    _close(low, 0.5 - 0.0961684696340044)
    _close(high, 0.5 + 0.0961684696340044)
    # 5/100: center = (0.05 + z^2/200) / (1 + z^2/100) = 0.0692072946034735 / 1.0384145882069412
    #   = 0.066647...; half = z / 1.0384145882069412 * sqrt(0.05 * 0.95 / 100 + z^2/40000)
    #   = 1.887449... * 0.0239898... = 0.045103...: (0.0215436791543680, 0.1117504692319191).
    low, high = wilson_interval(5, 100)
    _close(low, 0.0215436791543680)
    _close(high, 0.1117504692319191)


@pytest.mark.parametrize(
    "k,n,low,high",
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe_1998_table(k, n, low, high):
    """Newcombe (1998), Stat. Med. 17:857, worked examples, method 3 (score, no continuity correction),
    printed to 4 decimals: agreement within half a unit of the last printed digit."""
    got_low, got_high = wilson_interval(k, n)
    assert abs(got_low - low) <= 5e-5 and abs(got_high - high) <= 5e-5, (k, n, got_low, got_high)


@pytest.mark.parametrize(
    "k,n", [(1, 1), (1, 2), (3, 7), (12, 37), (36, 37), (500, 1003), (1, 1003), (999, 1003)]
)
def test_wilson_bounds_solve_the_score_equation(k, n):
    """Each bound p (away from the clamped ends) is a root of n (p_hat - p)^2 = z^2 p (1 - p), and the
    interval contains p_hat, stays in [0, 1], and shrinks as n grows at the same p_hat."""
    p_hat = k / n
    low, high = wilson_interval(k, n)
    assert 0.0 < low < p_hat < high < 1.0 or (k == n and low < p_hat and high == 1.0), (low, p_hat, high)
    for p in (low, high) if k < n else (low,):
        residual = n * (p_hat - p) ** 2 - Z2 * p * (1 - p)
        assert abs(residual) <= 1e-12 * max(1.0, n * (p_hat - p) ** 2), (p, residual)
    low2, high2 = wilson_interval(2 * k, 2 * n)
    assert high2 - low2 < high - low


def test_wilson_z_and_errors():
    # z = 0 collapses the interval to the point estimate.
    assert wilson_interval(3, 7, z=0.0) == (3 / 7, 3 / 7)
    assert wilson_interval(3, 7, z=2.5)[1] - wilson_interval(3, 7, z=2.5)[0] > (
        wilson_interval(3, 7)[1] - wilson_interval(3, 7)[0]
    )
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="outside"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="outside"):
        wilson_interval(-1, 4)


@pytest.mark.parametrize(
    "b,c,want",
    [
        (0, 5, 2 * 1 / 2**5),  # 2 * C(5,0) / 32 = 0.0625
        (5, 0, 0.0625),  # two-sided: symmetric in b, c
        (1, 9, 2 * (1 + 10) / 2**10),  # 22/1024 = 0.021484375
        (2, 8, 2 * (1 + 10 + 45) / 2**10),  # 112/1024 = 0.109375
        (0, 10, 2 / 2**10),  # 0.001953125
        (3, 3, 1.0),  # 2 * (1+6+15+20)/64 = 1.3125 -> capped at 1
        (4, 5, 1.0),  # 2 * (1+9+36+84+126)/512 = 1.0 exactly
        (0, 1, 1.0),  # 2 * 1/2
        (0, 0, 1.0),  # no discordant pair: no evidence
        (0, 200, 2.0**-199),  # exact at large n (no float underflow in the tail sum)
        (100, 100, 1.0),
    ],
)
def test_mcnemar_exact_fixtures(b, c, want):
    assert mcnemar_exact(b, c) == want


def test_mcnemar_exact_errors():
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 3)


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 1), (1, 1), (5, 100), (50, 100), (0, 20), (20, 20), (12, 37), (81, 263), (500, 1003)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson_interval(k, n)
        _close(low, float(ci.low), 1e-12)
        _close(high, float(ci.high), 1e-12)
    for b, c in [(0, 5), (1, 9), (2, 8), (3, 3), (7, 19), (30, 45), (0, 1), (137, 101)]:
        want = stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
        assert math.isclose(mcnemar_exact(b, c), float(want), rel_tol=1e-12), (b, c)


def test_paired_outcomes_counts_each_kind_of_pair():
    a = {"g1": True, "g2": True, "g3": False, "g4": False, "g5": True, "g6": True, "g7": True}
    b = {"g1": True, "g2": False, "g3": True, "g4": False, "g5": False, "g6": False, "g7": False}
    got = paired_outcomes(a, b)
    # wins g2 g5 g6 g7 (A only), loss g3 (B only), both won g1, both lost g4; p = 2 * (1 + 5) / 32.
    assert got == {"wins": 4, "losses": 1, "ties_success": 1, "ties_fail": 1, "n": 7, "p": 0.375}
    flipped = paired_outcomes(b, a)
    assert (flipped["wins"], flipped["losses"], flipped["p"]) == (1, 4, 0.375)


def test_paired_outcomes_names_the_missing_game():
    a = {"games/valid_seen/a": True, "games/valid_seen/b": False}
    with pytest.raises(ValueError, match="only in A \\['games/valid_seen/b'\\]"):
        paired_outcomes(a, {"games/valid_seen/a": True})
    with pytest.raises(ValueError, match="only in B \\['games/valid_unseen/c'\\]"):
        paired_outcomes(a, {**a, "games/valid_unseen/c": True})


def test_pooled_success_pools_episodes_over_seeds():
    by_seed = {
        0: {"g1": True, "g2": False, "g3": False, "g4": False},
        1: {"g1": True, "g2": True, "g3": False},
    }
    got = pooled_success(by_seed)
    assert (got["successes"], got["episodes"], got["rate"]) == (3, 7, 3 / 7)
    assert got["ci95"] == list(wilson_interval(3, 7))  # pooled episodes, not the mean of seed rates
    assert got["per_seed"] == {
        0: {"successes": 1, "episodes": 4, "rate": 0.25},
        1: {"successes": 2, "episodes": 3, "rate": 2 / 3},
    }
    with pytest.raises(ValueError, match="n > 0"):
        pooled_success({0: {}})


def test_paired_over_seeds_pairs_same_seed_and_pools_counts():
    a = {0: {"g1": True, "g2": True, "g3": False}, 1: {"g1": True, "g2": True, "g3": True}}
    b = {0: {"g1": False, "g2": True, "g3": True}, 1: {"g1": False, "g2": False, "g3": False}, 2: {}}
    got = paired_over_seeds(a, b)
    # seed 0: win g1, loss g3, both won g2; seed 1: wins g1 g2 g3. Pooled: 4 wins, 1 loss:
    # p = 2 * (1 + 5) / 32 = 0.375 (not a combination of the per-seed p-values).
    assert {k: got[k] for k in ("wins", "losses", "ties_success", "ties_fail", "n", "p")} == {
        "wins": 4,
        "losses": 1,
        "ties_success": 1,
        "ties_fail": 0,
        "n": 6,
        "p": 0.375,
    }
    assert got["per_seed"][0]["p"] == 1.0 and got["per_seed"][1]["p"] == 0.25
    assert set(got["per_seed"]) == {0, 1}, "B's extra seed 2 is not paired"
    with pytest.raises(ValueError, match="seeds \\[1\\]"):
        paired_over_seeds(a, {0: b[0]})
