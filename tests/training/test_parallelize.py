"""The model as the recipe builds it: meta build in the master dtype, FSDP2 with the mixed-precision policy,
filled from a full state dict. One gloo process (a real process group, torn down after the module)."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor

from docev.models.docev import DocEVCheckpointer, docev_tiny, init_rope
from docev.training.parallelize import mixed_precision_policy, precision_warning, setup_model

MODEL_CFG = OmegaConf.create({"_component_": "docev.models.docev.docev_tiny"})


@pytest.fixture(scope="module")
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    yield
    dist.destroy_process_group()


def test_policy_casts_only_when_master_and_compute_differ():
    mixed = mixed_precision_policy(torch.bfloat16, torch.float32)
    assert (mixed.param_dtype, mixed.reduce_dtype) == (torch.bfloat16, torch.float32)
    for dtype in (torch.bfloat16, torch.float32):
        same = mixed_precision_policy(dtype, dtype)
        assert (same.param_dtype, same.reduce_dtype) == (None, None)


def test_the_bf16_warning_says_what_rounding_does():
    """The threshold in the message, checked against torch's own bf16 arithmetic: adding lr to a bf16 weight
    is a no-op from |w| ≥ 512·lr on and never below 128·lr (bf16's ulp doubles at each power of two)."""
    lr = 1e-5
    msg = precision_warning(torch.bfloat16, lr)
    assert msg is not None and "optimizer.lr 1e-05" in msg and "0.0026" in msg and "master_dtype: fp32" in msg
    assert precision_warning(torch.float32, lr) is None
    assert precision_warning(torch.bfloat16, 1e-4) is None
    assert precision_warning(torch.bfloat16, None) is None
    w = torch.logspace(-5, 0, 2000).to(torch.bfloat16)
    lost = (w + torch.tensor(lr, dtype=torch.bfloat16)) == w
    assert lost[w.float() >= 512 * lr].all() and not lost[w.float() <= 128 * lr].any()


def test_fp32_master_weights_bf16_compute(group, tiny_checkpoint):
    """fp32 sharded parameters and gradients, the frozen tower replicated in bf16; the forward equals the same
    weights cast to bf16 in a plain model."""
    state = DocEVCheckpointer(tiny_checkpoint).load_checkpoint()["model"]
    model = setup_model(
        MODEL_CFG, dict(state), torch.device("cpu"), compute_dtype=torch.bfloat16, master_dtype=torch.float32
    )
    for name, p in model.named_parameters():
        tower = name.startswith("encoder.")
        assert isinstance(p, DTensor) != tower and p.dtype == (torch.bfloat16 if tower else torch.float32), name
    held = model.state_dict()
    for k, v in state.items():  # the base's bits, held exactly (the tower: in the compute dtype it runs in)
        assert (
            torch.equal(held[k], v.to(torch.bfloat16))
            if k.startswith("encoder.")
            else torch.equal(held[k].full_tensor(), v)
        ), k

    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    reference = docev_tiny()
    reference.load_state_dict(state)
    in_fp32 = reference(tokens)
    reference.to(torch.bfloat16)
    init_rope(reference, dtype=torch.bfloat16)  # RoPE caches made in the compute dtype, as setup_model does
    assert torch.equal(logits, reference(tokens))  # torchtune upcasts the logits; the layers ran in bf16
    assert not torch.equal(logits, in_fp32)

    logits.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_bf16_master_keeps_todays_bf16_everything(group, tiny_checkpoint):
    state = DocEVCheckpointer(tiny_checkpoint).load_checkpoint()["model"]
    model = setup_model(
        MODEL_CFG, dict(state), torch.device("cpu"), compute_dtype=torch.bfloat16, master_dtype=torch.bfloat16
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_fsdp_view_warning_silenced_for_the_models_loss_chunks_only(group, tiny_checkpoint):
    """The chunked output's views are read, never modified in place: FSDP2's warning about them is filtered for
    the DocEV root; the same warning about another module still shows."""
    import warnings

    state = DocEVCheckpointer(tiny_checkpoint).load_checkpoint()["model"]
    with warnings.catch_warnings(record=True) as caught:
        model = setup_model(
            MODEL_CFG, dict(state), torch.device("cpu"), compute_dtype=torch.float32, master_dtype=torch.float32
        )
        model.set_num_output_chunks(4)
        chunks = model(torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0)))
        assert len(chunks) == 4 and chunks[0]._base is not None  # views, the case FSDP2 warns about
        sum(c.float().sum() for c in chunks).backward()
        assert not [w for w in caught if "returned a view tensor" in str(w.message)]
        warnings.warn("FSDP2-wrapped module (Other) returned a view tensor. An in-place op…", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught if "view tensor" in str(w.message)][0].startswith(
        "FSDP2-wrapped module (Other)"
    )
