"""The recipe's resumable pieces round-trip through their state dicts (the recipe tests resume them for real)."""

import pytest

from docev.training.state import Entry, Progress, WandbRun


def test_progress_round_trips_and_refuses_another_seed():
    done = Progress(seed=42, world_size=2)
    done.step, done.tokens = 7, 1234
    resumed = Progress(seed=42, world_size=1)  # another world size: resumed, with a warning
    resumed.load_state_dict(done.state_dict())
    assert (resumed.step, resumed.tokens) == (7, 1234)
    with pytest.raises(ValueError, match="trained with seed 42, this run has 1"):
        Progress(seed=1, world_size=2).load_state_dict(done.state_dict())


def test_entry_and_wandb_run():
    class Counter:
        def __init__(self, n=0):
            self.n = n

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    saved = {**Entry("sampler", Counter(5)).state_dict(), **Entry("lr_scheduler", None).state_dict()}
    assert saved == {"sampler": {"n": 5}, "lr_scheduler": None}
    fresh = Counter()
    Entry("sampler", fresh).load_state_dict(saved)
    Entry("lr_scheduler", None).load_state_dict(saved)  # no scheduler in this run: nothing to restore
    assert fresh.n == 5
    run = WandbRun()
    run.id = "abc"
    restarted = WandbRun()
    restarted.load_state_dict(run.state_dict())
    assert restarted.saved == "abc" and restarted.id is None
