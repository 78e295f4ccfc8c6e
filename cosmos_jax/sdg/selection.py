"""Which candidates become episodes: `--best-of N` draws N candidates per episode and keeps the best score,
`--min-consistency X` then drops an episode whose score is below X.

Episode slot s of a job owns the candidates with sample indices s·N .. s·N + N − 1. The best is the highest
consistency score, the lowest sample index on ties; a candidate without a score (an unlabelled dataset)
ranks below any scored one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def slot_samples(slot: int, best_of: int) -> list[int]:
    """The sample indices of episode slot `slot`."""
    return list(range(slot * best_of, (slot + 1) * best_of))


@dataclasses.dataclass(frozen=True)
class Choice:
    """The outcome of one slot: the kept sample index (None: every candidate rejected) and the rejected ones
    with why ("best_of": a better candidate was kept; "min_consistency": below the threshold)."""

    kept: int | None
    rejected: tuple[tuple[int, str], ...]


def choose(scores: Sequence[tuple[int, float | None]], min_consistency: float | None) -> Choice:
    """The slot's choice from (sample index, consistency | None) of each of its candidates."""
    if not scores:
        raise ValueError("a slot needs at least one candidate")
    ranked = sorted(scores, key=lambda item: (item[1] is None, -(item[1] or 0.0), item[0]))
    best, best_score = ranked[0]
    rejected = [(index, "best_of") for index, _ in ranked[1:]]
    if min_consistency is not None and (best_score is None or best_score < min_consistency):
        rejected.insert(0, (best, "min_consistency"))
        best = None
    return Choice(best, tuple(sorted(rejected)))
