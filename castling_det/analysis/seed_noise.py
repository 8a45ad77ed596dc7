"""How far apart two arms of the accuracy ablation are, measured against the noise between seeds.

With two or three seeds per arm, an arm's own sample std is a poor estimate of how much a
training run's box AP moves with its seed. Every arm here is the same detector, recipe and data
with a different attention, so the seed noise is taken as common to all of them and estimated
once: the pooled sample variance of every arm with two seeds or more (each weighted by its
degrees of freedom). A difference of means then has the standard error
``sigma * sqrt(1/n_a + 1/n_b)``, defined for one-seed arms too.
"""
import math
import statistics
from typing import List, Mapping, NamedTuple, Optional, Sequence

__all__ = ["ArmDifference", "PooledNoise", "arm_difference", "difference_markdown", "pooled_seed_noise"]


class PooledNoise(NamedTuple):
    """The seed-to-seed std of one run's box AP, pooled over arms, and its degrees of freedom."""

    std: float
    dof: int


class ArmDifference(NamedTuple):
    """Mean box AP of one arm minus another's, and its standard error."""

    difference: float
    standard_error: float


def pooled_seed_noise(ap_by_arm: Mapping[str, Sequence[float]]) -> Optional[PooledNoise]:
    """The pooled sample std of the arms' values (one per seed); None if no arm has two seeds."""
    squares, dof = 0.0, 0
    for values in ap_by_arm.values():
        if len(values) > 1:
            squares += statistics.variance(values) * (len(values) - 1)
            dof += len(values) - 1
    return PooledNoise(math.sqrt(squares / dof), dof) if dof else None


def arm_difference(values: Sequence[float], reference: Sequence[float], noise: PooledNoise) -> ArmDifference:
    """mean(values) - mean(reference), with the standard error the pooled seed noise gives it."""
    if not values or not reference:
        raise ValueError("arm_difference needs at least one value per arm")
    error = noise.std * math.sqrt(1 / len(values) + 1 / len(reference))
    return ArmDifference(statistics.mean(values) - statistics.mean(reference), error)


def _difference_cell(difference: ArmDifference) -> str:
    """``"+0.6 ± 0.6 (1.0 s.e.)"``, a true minus sign for negatives."""
    sign = "+" if difference.difference >= 0 else "\u2212"
    ratio = abs(difference.difference) / difference.standard_error if difference.standard_error else math.inf
    return f"{sign}{abs(difference.difference):.1f} ± {difference.standard_error:.1f} ({sign}{ratio:.1f} s.e.)"


def difference_markdown(ap_by_arm: Mapping[str, Sequence[float]], references: Sequence[str]) -> List[str]:
    """Markdown lines: the pooled seed noise, then one row per arm with its mean box AP minus each
    reference arm's (those of ``references`` that have runs), as difference ± standard error; no
    lines if no arm has two seeds or no reference has runs."""
    noise = pooled_seed_noise(ap_by_arm)
    present = [name for name in references if ap_by_arm.get(name)]
    if noise is None or not present:
        return []
    lines = [
        f"Seed noise, pooled over the arms with two seeds or more: std {noise.std:.2f} AP per run "
        f"({noise.dof} degrees of freedom). Mean box AP minus the reference's, ± its standard error "
        "(std · √(1/n + 1/n_ref)), and that difference in standard errors: within about 2 s.e. "
        "the two arms are not told apart by these seeds.",
        "",
        "| arm | seeds (n) | " + " | ".join(f"− {name}" for name in present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for arm, values in ap_by_arm.items():
        cells = ["—" if arm == name else _difference_cell(arm_difference(values, ap_by_arm[name], noise))
                 for name in present]
        lines.append(f"| {arm} | {len(values)} | " + " | ".join(cells) + " |")
    return lines
