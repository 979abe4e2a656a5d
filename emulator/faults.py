"""Fault injection: one seeded RNG per fault setting, so a run is reproducible."""

from __future__ import annotations

import random
from collections import Counter

from falflow.emulator.config import Faults


class FaultInjector:
    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(faults.seed)

    def set(self, faults: Faults) -> None:
        """New probabilities, a reseeded RNG and zeroed counts."""
        self.faults = faults
        self.injected.clear()
        self._rng = random.Random(faults.seed)

    def draw(self, name: str) -> bool:
        """Whether the fault ``name`` (a Faults field) strikes now; a disabled one (0) consumes
        no randomness."""
        probability: float = getattr(self.faults, name)
        hit = probability > 0 and self._rng.random() < probability
        if hit:
            self.injected[name] += 1
        return hit

    def pick(self, count: int) -> int:
        """An index below ``count`` from the same RNG (which file a fault strikes)."""
        return self._rng.randrange(count)
