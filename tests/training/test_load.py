"""Each rank reads only what it keeps (docev.training.load with the checkpointer's row reader), and the model it
builds equals, bit for bit, the one torchtune's full-state-dict load builds (load_worker.py, 2 gloo ranks): full
and hybrid sharding, fp32 and bf16 master weights, a frozen (replicated) and a trainable (sharded) vision tower,
LoRA. Peak host memory is measured by benchmarks/load_memory.py, not here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo_ranks import run_ranks

from docev.training.load import fill_model

WORKER = Path(__file__).with_name("load_worker.py")

pytestmark = pytest.mark.slow  # a torchrun worker on 2 gloo ranks (`make test-fast` leaves it out)


@pytest.fixture(scope="module")
def results(tiny_checkpoint, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("load") / "results.pt"
    return run_ranks(WORKER, 2, tiny_checkpoint, out=out)


@pytest.mark.parametrize("scenario", ["full", "full_bf16_master", "hybrid", "replicated", "trainable_tower", "lora"])
def test_each_rank_holds_the_old_loads_bits(results, scenario):
    for rank in results[scenario]:
        assert rank["compared"] > 50 and rank["mismatched"] == [], rank["mismatched"][:5]


def test_each_rank_reads_only_the_rows_it_keeps(results):
    """Bytes taken out of the files = bytes of the rank's rows (+ the replicated tower and the unused tensors, read
    whole): at 2 ranks the q/k heads split evenly, so nothing else is read. Reading a whole tensor and slicing it
    would double the sharded part."""
    for scenario in ("full", "hybrid", "trainable_tower", "lora"):
        ranks = results[scenario]
        for rank in ranks:
            assert rank["read"] == rank["kept"], (scenario, rank["read"], rank["kept"])
        assert ranks[0]["kept"] < 0.65 * results["replicated"][0]["kept"], scenario  # about half is sharded away
    for rank in results["replicated"]:  # mesh (2, 1): every rank keeps, and reads, everything
        assert rank["read"] == rank["kept"]


def test_lora_adapters_start_as_torchtune_initialises_them(results):
    for rank in results["lora"]:
        assert rank["adapters_zero"] and all(rank["adapters_zero"])  # lora_b = 0: the adapted model is the base


def test_a_checkpoint_that_does_not_fit_is_named():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"weight: the checkpoint holds \(3, 5\), the model \(3, 4\)"):
        fill_model(model, {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}, torch.device("cpu"))
    missing, unexpected = fill_model(model, {"weight": torch.ones(3, 4), "other": torch.zeros(1)}, torch.device("cpu"))
    assert (missing, unexpected) == (["bias"], ["other"]) and torch.equal(model.weight, torch.ones(3, 4))
