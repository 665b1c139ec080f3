"""``train.gradient_reduction: last_micro_batch`` with bf16 compute and fp32 master weights when a rank's
micro-batches carry no image, or an image only in the last one (grad_dtype_worker.py, 2 gloo ranks).

FSDP2 accumulates the unsharded gradients of the skipped reductions in fp32; a parameter that got no gradient
in an earlier micro-batch would bring a bf16 one to the last micro-batch's reduce-scatter ("FSDP
reduce-scatter expects uniform gradient dtype"). The model gives every trainable parameter of the vision path
a zero gradient in image-less micro-batches, so each accumulates like the rest. Gradients must equal those of
reducing every micro-batch: bf16 compute, fp32 accumulation in another order: 2% relative norm per tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo_ranks import run_ranks

WORKER = Path(__file__).with_name("grad_dtype_worker.py")

pytestmark = pytest.mark.slow  # a torchrun worker on 2 gloo ranks (`make test-fast` leaves it out)


@pytest.fixture(scope="module")
def results(tiny_checkpoint, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("grad_dtype") / "results.pt"
    return run_ranks(WORKER, 2, tiny_checkpoint, out=out, timeout=300)


@pytest.mark.parametrize("pattern", ["text", "late"])
def test_last_micro_batch_trains_with_an_imageless_rank(results, pattern):
    last, every = results[f"{pattern}/last_micro_batch"], results[f"{pattern}/every_micro_batch"]
    assert last["grads"].keys() == every["grads"].keys()
    assert {g.dtype for g in last["grads"].values()} == {torch.float32}
    connector = [k for k in last["grads"] if k.startswith("connector.")]
    assert connector and all(last["grads"][k].norm() > 0 for k in connector)  # rank 0's images reach them
    for k, g in every["grads"].items():
        if g.norm() > 0:
            assert ((last["grads"][k] - g).norm() / g.norm()).item() < 0.02, k
    torch.testing.assert_close(last["losses"], every["losses"], rtol=0, atol=0)
