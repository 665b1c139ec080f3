"""The epoch plan: which samples form each step's batch on each rank, at which sampling ratio.

One object decides everything random about the data order, from ``(seed, epoch)`` alone, so every
rank computes the same plan and a resumed run continues at the exact next step:

- **mixing**: each source contributes ``round(weight × size)`` samples per epoch (weights above 1
  repeat samples, below 1 subsample), drawn with the epoch's generator;
- **ratio per step**: one sampling ratio per global step, drawn from ``Random((seed, epoch, step))``
  (identical on every rank, reproducible on resume) and raised to the smallest configured ratio at
  which every sample of the step fits ``max_seq_len``;
- **batches**: plain (``batch_size`` samples per rank), length-bucketed (sorted inside windows of
  shuffled samples, then batch order shuffled) or packed (samples laid end to end into rows of at
  most ``max_seq_len`` tokens at the step's ratio);
- **state**: ``state_dict()`` = (epoch, steps consumed); ``load_state_dict`` resumes there.

Used as a DataLoader ``batch_sampler``: it yields, for this rank, a list of ``(index, ratio, row)``
triples (``row`` is the packed row a sample belongs to; plain batches have one sample per row).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np

BUCKET_WINDOW_BATCHES = 64
PACK_WINDOW_MIN = 32
PACK_WINDOW_PER_ROW = 8


class DocEVBatchSampler:
    def __init__(
        self,
        lengths: dict[int, np.ndarray],
        sources: np.ndarray,
        weights: Sequence[float],
        *,
        batch_size: int,
        max_seq_len: int,
        ratios: Sequence[int],
        random_ratio: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        bucket_by_length: bool = False,
        packed: bool = False,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        if sorted(lengths) != sorted(ratios):
            raise ValueError(f"lengths are known for ratios {sorted(lengths)}, config asks for {sorted(ratios)}")
        self.lengths = {r: np.asarray(v, dtype=np.int64) for r, v in lengths.items()}
        self.sources = np.asarray(sources, dtype=np.int64)
        self.weights = list(weights)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.ratios = sorted(ratios)
        self.first_ratio = ratios[0]
        self.random_ratio = random_ratio
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.shuffle, self.bucket_by_length, self.packed = shuffle, bucket_by_length, packed
        self.epoch, self.start_step = 0, 0
        self._plan: tuple[int, list[list[list[tuple[int, int, int]]]]] | None = None

    # -- state -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_step = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.start_step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.start_step = int(state["epoch"]), int(state["step"])

    def advance(self, steps: int = 1) -> None:
        """Record that ``steps`` batches were consumed (the recipe calls this after each step)."""
        self.start_step += steps

    # -- plan --------------------------------------------------------------------------------
    def _epoch_indices(self, gen: np.random.Generator) -> np.ndarray:
        picked = []
        for s, weight in enumerate(self.weights):
            idx = np.flatnonzero(self.sources == s)
            want = int(round(weight * len(idx)))
            if want == 0 or len(idx) == 0:
                continue
            reps, rest = divmod(want, len(idx))
            picked.append(np.tile(idx, reps))
            if rest:
                picked.append(np.sort(gen.choice(idx, size=rest, replace=False)) if self.shuffle else idx[:rest])
        order = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
        return gen.permutation(order) if self.shuffle else order

    def step_ratio(self, step: int) -> int:
        """The drawn ratio of a global step (before raising it for samples that do not fit)."""
        if not self.random_ratio or len(self.ratios) == 1:
            return self.first_ratio
        return random.Random(f"{self.seed}:{self.epoch}:{step}").choice(self.ratios)

    def _fit_ratio(self, ratio: int, indices: Sequence[int]) -> int:
        """Smallest configured ratio ≥ ``ratio`` at which every sample fits (largest if none does)."""
        for r in self.ratios:
            if r >= ratio and all(self.lengths[r][i] <= self.max_seq_len for i in indices):
                return r
        return self.ratios[-1]

    def _plain_batches(self, order: np.ndarray, gen: np.random.Generator) -> list[np.ndarray]:
        per_step = self.batch_size * self.num_replicas
        if self.bucket_by_length:
            key = self.lengths[self.ratios[0]]
            window = per_step * BUCKET_WINDOW_BATCHES
            order = np.concatenate([
                order[s : s + window][np.argsort(key[order[s : s + window]], kind="stable")]
                for s in range(0, len(order), window)
            ]) if len(order) else order  # fmt: skip
        n = len(order) // per_step  # a partial last step would leave some rank without data
        batches = [order[i * per_step : (i + 1) * per_step] for i in range(n)]
        if self.bucket_by_length and self.shuffle:
            batches = [batches[i] for i in gen.permutation(len(batches))]
        return batches

    def _build(self) -> list[list[list[tuple[int, int, int]]]]:
        """steps → ranks → [(index, ratio, row)]."""
        gen = np.random.default_rng([self.seed, self.epoch])
        order = self._epoch_indices(gen)
        if self.packed:
            return self._packed_steps(order)
        steps = []
        for step, batch in enumerate(self._plain_batches(order, gen)):
            ratio = self._fit_ratio(self.step_ratio(step), batch)
            ranks = [batch[r * self.batch_size : (r + 1) * self.batch_size] for r in range(self.num_replicas)]
            steps.append([[(int(i), ratio, k) for k, i in enumerate(part)] for part in ranks])
        return steps

    def _packed_steps(self, order: np.ndarray) -> list[list[list[tuple[int, int, int]]]]:
        """Best-fit packing over a look-ahead window of the shuffled order (next-fit alone wastes ~20%)."""
        need = self.batch_size * self.num_replicas
        window = max(PACK_WINDOW_MIN, PACK_WINDOW_PER_ROW * need)
        pending: list[int] = []
        steps, pos = [], 0
        while True:
            pos = self._refill(pending, order, pos, window)
            if not pending:
                break
            ratio = self.step_ratio(len(steps))
            while True:  # raise the step's ratio until its rows can be filled
                trial, trial_pos = list(pending), pos
                rows, trial_pos = self._pack_rows(trial, order, trial_pos, window, ratio, need)
                if rows is not None or ratio == self.ratios[-1]:
                    break
                ratio = next(r for r in self.ratios if r > ratio)
            if rows is None:
                raise ValueError(
                    f"samples {trial[:4]} are longer than max_seq_len {self.max_seq_len} at every ratio "
                    f"{self.ratios}; preprocess applies the overflow policy, so the shards are stale"
                )
            if len(rows) < need:
                break  # the epoch's tail cannot fill a step on every rank
            pending[:], pos = trial, trial_pos
            per_rank = [rows[r * self.batch_size : (r + 1) * self.batch_size] for r in range(self.num_replicas)]
            steps.append([[(i, ratio, k) for k, row in enumerate(part) for i in row] for part in per_rank])
        return steps

    @staticmethod
    def _refill(pending: list[int], order: np.ndarray, pos: int, window: int) -> int:
        take = max(0, window - len(pending))
        pending.extend(int(i) for i in order[pos : pos + take])
        return min(pos + take, len(order))

    def _pack_rows(
        self, pending: list[int], order: np.ndarray, pos: int, window: int, ratio: int, need: int
    ) -> tuple[list[list[int]] | None, int]:
        """Fill up to ``need`` rows from ``pending`` (oldest sample first, then best fit). ``None`` when a row
        cannot start because the waiting samples are too long at ``ratio``."""
        lengths, rows = self.lengths[ratio], []
        while len(rows) < need and pending:
            if lengths[pending[0]] > self.max_seq_len:  # the oldest sample must go first: none waits forever
                return None, pos
            free = self.max_seq_len - lengths[pending[0]]
            row = [pending.pop(0)]
            while True:
                fits = [k for k, i in enumerate(pending) if lengths[i] <= free]
                if not fits:
                    break
                k = max(fits, key=lambda k: lengths[pending[k]])
                free -= lengths[pending[k]]
                row.append(pending.pop(k))
            rows.append(row)
            pos = self._refill(pending, order, pos, window)
        return rows, pos

    def _steps(self) -> list[list[list[tuple[int, int, int]]]]:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._build())
        return self._plan[1]

    def __len__(self) -> int:
        return len(self._steps())

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        steps = self._steps()
        for step in range(self.start_step, len(steps)):
            yield steps[step][self.rank]
