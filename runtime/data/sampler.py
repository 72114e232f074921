"""The sample order: a deterministic mixture over sources, sliced per data-parallel rank.

Step k's global batch is `global_batch` samples. Which source each sample comes from is drawn
from the mixture weights by a generator seeded with (seed, k), so any rank can recompute any step
without reading data. Within a source, samples are taken in the order of a permutation seeded with
(seed, source, epoch), one epoch after another; a counter per source says how far it has gone.
Every rank advances every counter (they are a few integers), but rank r materialises only
positions [r * global_batch / dp, (r + 1) * global_batch / dp) of each batch.

The sampler's state (steps taken, counters) goes into checkpoints, so a resumed run continues with
exactly the samples the uninterrupted run would have drawn.
"""

import numpy as np


class MixtureSampler:
    """Yields, per optimizer step, this rank's list of (source, sample index) pairs."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, global_batch: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if len(sizes) != len(weights):
            raise ValueError("one weight per source")
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} does not divide over dp = {dp_size}")
        if min(sizes) < 1:
            raise ValueError("every source needs at least one sample")
        self.sizes = list(sizes)
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.seed, self.global_batch = seed, global_batch
        self.rank, self.dp = dp_rank, dp_size
        self.step = 0
        self.counters = [0] * len(sizes)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 2 * len(self.sizes):
                self._perms.clear()
            rng = np.random.default_rng([self.seed, 1 + source, epoch])
            self._perms[key] = rng.permutation(self.sizes[source])
        return self._perms[key]

    def sources_of_step(self, step: int) -> np.ndarray:
        """The source of each of the `global_batch` samples of a step (same on every rank)."""
        if len(self.sizes) == 1:
            return np.zeros(self.global_batch, dtype=np.int64)
        return np.random.default_rng([self.seed, 0, step]).choice(len(self.sizes), self.global_batch, p=self.probs)

    def next_step(self) -> list[tuple[int, int]]:
        """This rank's samples of the next step, in order; advances the state."""
        sources = self.sources_of_step(self.step)
        per_rank = self.global_batch // self.dp
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        mine = []
        for position, s in enumerate(sources):
            s = int(s)
            c = self.counters[s]
            self.counters[s] += 1
            if lo <= position < hi:
                n = self.sizes[s]
                mine.append((s, int(self._perm(s, c // n)[c % n])))
        self.step += 1
        return mine

    def state_dict(self) -> dict:
        return {"step": self.step, "counters": list(self.counters), "seed": self.seed,
                "global_batch": self.global_batch, "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        if state["sizes"] != self.sizes or state["global_batch"] != self.global_batch:
            raise ValueError(f"the data changed since the checkpoint (samples per source {state['sizes']} -> "
                             f"{self.sizes}, global batch {state['global_batch']} -> {self.global_batch})")
        self.step, self.counters = int(state["step"]), [int(c) for c in state["counters"]]
