"""Statistics for paired evaluation: Wilson intervals, the exact McNemar test, Newcombe's paired-difference interval.

Evaluation is paired: every arm of a comparison runs on the same held-out seeds (the same start states), so two
arms are compared seed by seed. Of the n seeds, ``a`` succeed in both arms, ``b`` only in A, ``c`` only in B and
``d`` in neither. Then

- each success rate gets its Wilson score interval (`wilson_interval`);
- the difference ``rate_a - rate_b = (b - c) / n`` gets Newcombe's hybrid-score interval for paired proportions
  (`paired_difference_interval`);
- the hypothesis "the arms are equally good" gets the exact McNemar test (`mcnemar_exact`): under it each
  discordant seed is equally likely to favour either arm.

`PairedComparison.from_outcomes` builds all of it from two per-seed outcome lists and refuses lists whose seeds
differ. Pure Python, no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeAlias

Z95 = 1.959964
"""The 97.5% quantile of the standard normal: two-sided 95% intervals."""

Outcomes: TypeAlias = Mapping[int, bool] | Iterable[tuple[int, bool]]
"""Per-seed success outcomes: ``{seed: success}`` or ``[(seed, success), ...]``."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value for `b` and `c` discordant pairs.

    Under the null hypothesis each of the ``b + c`` discordant pairs favours either arm with probability 1/2, so
    ``p = min(1, 2 * P[X <= min(b, c)])`` with ``X ~ Binomial(b + c, 1/2)``; 1.0 when there are no discordant
    pairs. Computed with exact integers (then one correctly rounded division), so it is exact for any n.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / (1 << n))


def paired_difference_interval(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float]:
    """A confidence interval (95% by default) for ``p_A - p_B = (b - c) / n`` from a paired 2x2 table.

    The table: `a` seeds succeed in both arms, `b` only in A, `c` only in B, `d` in neither; ``n = a+b+c+d``.
    This is Newcombe's hybrid score interval without continuity correction, "method 10" of R. G. Newcombe,
    Improved confidence intervals for the difference between binomial proportions based on paired data,
    Statistics in Medicine 17:2635-2650 (1998). With ``p_A = (a+b)/n`` and ``p_B = (a+c)/n``, their Wilson
    intervals ``(l_A, u_A)`` and ``(l_B, u_B)``, and Newcombe's corrected phi coefficient of the table

        phi = max(a*d - b*c - n/2, 0) / sqrt((a+b) (c+d) (a+c) (b+d))   when a*d > b*c,
        phi = (a*d - b*c) / sqrt((a+b) (c+d) (a+c) (b+d))               otherwise,
        phi = 0                                                         when a margin is empty,

    the interval is

        lower = D - sqrt((p_A - l_A)^2 - 2 phi (p_A - l_A)(u_B - p_B) + (u_B - p_B)^2)
        upper = D + sqrt((u_A - p_A)^2 - 2 phi (u_A - p_A)(p_B - l_B) + (p_B - l_B)^2)

    with ``D = p_A - p_B``. (Without the ``- n/2`` in phi it is Newcombe's method 8.) Degenerate cases: n = 0
    gives (-1, 1), nothing being known; an empty margin (an arm that always or never succeeds) sets phi to 0
    as Newcombe prescribes; the ends are clipped to [-1, 1]. Reproduces published values: Newcombe's example
    (a, b, c, d) = (20, 12, 2, 16) gives D = 0.2 in (0.0562, 0.3292) (method 8: (0.0618, 0.3242)); Fagerland,
    Lydersen and Laake (Stat Med 2014) (1, 1, 7, 12) gives (-0.507, -0.026).
    """
    if min(a, b, c, d) < 0:
        raise ValueError(f"table counts must be non-negative, got a={a}, b={b}, c={c}, d={d}")
    n = a + b + c + d
    if n == 0:
        return -1.0, 1.0
    p_a, p_b = (a + b) / n, (a + c) / n
    low_a, high_a = wilson_interval(a + b, n, z)
    low_b, high_b = wilson_interval(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross: float = a * d - b * c
    if cross > 0:
        cross = max(cross - n / 2, 0.0)  # Newcombe's correction of a positive correlation
    phi = cross / math.sqrt(margins) if margins > 0 else 0.0
    diff = p_a - p_b
    dl_a, du_a = p_a - low_a, high_a - p_a
    dl_b, du_b = p_b - low_b, high_b - p_b
    # |phi| <= 1, so each radicand is >= (x - y)^2 >= 0; max() only guards against rounding.
    lower = diff - math.sqrt(max(0.0, dl_a**2 - 2 * phi * dl_a * du_b + du_b**2))
    upper = diff + math.sqrt(max(0.0, du_a**2 - 2 * phi * du_a * dl_b + dl_b**2))
    return max(-1.0, lower), min(1.0, upper)


def _as_outcome_map(outcomes: Outcomes, name: str) -> dict[int, bool]:
    pairs = outcomes.items() if isinstance(outcomes, Mapping) else outcomes
    result: dict[int, bool] = {}
    for seed, success in pairs:
        if int(seed) in result:
            raise ValueError(f"{name} has seed {seed} more than once")
        result[int(seed)] = bool(success)
    return result


def _describe_seeds(seeds: set[int]) -> str:
    shown = ", ".join(str(s) for s in sorted(seeds)[:3])
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({shown}{', ...' if len(seeds) > 3 else ''})"


@dataclass(frozen=True)
class PairedComparison:
    """Two arms evaluated on the same seeds: both rates with Wilson intervals, their difference A - B with
    Newcombe's interval, and the exact McNemar p-value. `b`: seeds only A solved; `c`: seeds only B solved."""

    n: int
    successes_a: int
    successes_b: int
    rate_a: float
    ci_a: tuple[float, float]
    rate_b: float
    ci_b: tuple[float, float]
    both: int  # seeds both arms solved
    b: int
    c: int
    neither: int  # seeds neither arm solved
    difference: float  # rate_a - rate_b
    ci_difference: tuple[float, float]
    p_value: float  # exact two-sided McNemar

    @classmethod
    def from_outcomes(cls, a: Outcomes, b: Outcomes, *, names: tuple[str, str] = ("A", "B")) -> PairedComparison:
        """Compare per-seed outcomes of arm A and arm B; ValueError when the seed sets differ (or repeat)."""
        first, second = _as_outcome_map(a, names[0]), _as_outcome_map(b, names[1])
        if first.keys() != second.keys():
            missing = ((first.keys() - second.keys(), names[0]), (second.keys() - first.keys(), names[1]))
            parts = [f"{_describe_seeds(seeds)} only in {name}" for seeds, name in missing if seeds]
            raise ValueError(f"a paired comparison needs the same seeds in both evaluations, but {' and '.join(parts)}")
        both = sum(first[s] and second[s] for s in first)
        only_a = sum(first[s] and not second[s] for s in first)
        only_b = sum(second[s] and not first[s] for s in first)
        n = len(first)
        neither = n - both - only_a - only_b
        return cls(
            n=n,
            successes_a=both + only_a,
            successes_b=both + only_b,
            rate_a=(both + only_a) / n if n else 0.0,
            ci_a=wilson_interval(both + only_a, n),
            rate_b=(both + only_b) / n if n else 0.0,
            ci_b=wilson_interval(both + only_b, n),
            both=both,
            b=only_a,
            c=only_b,
            neither=neither,
            difference=(only_a - only_b) / n if n else 0.0,
            ci_difference=paired_difference_interval(both, only_a, only_b, neither),
            p_value=mcnemar_exact(only_a, only_b),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcomes_from_report(report: Any) -> dict[int, bool]:
    """``{seed: success}`` from a `wmpo eval` JSON report (its ``per_episode`` list); ValueError if it is not one."""
    if not isinstance(report, Mapping):
        raise ValueError("not a `wmpo eval` report (expected a JSON object)")
    episodes = report.get("per_episode")
    if not isinstance(episodes, list) or not all(
        isinstance(e, Mapping) and isinstance(e.get("seed"), int) and isinstance(e.get("success"), bool)
        for e in episodes
    ):
        raise ValueError("not a `wmpo eval` report (no per_episode list of seeds and successes)")
    try:
        return _as_outcome_map(((e["seed"], e["success"]) for e in episodes), "its per_episode list")
    except ValueError as exc:
        raise ValueError(f"not a valid `wmpo eval` report ({exc})") from None
