"""Adapter runs of the recipe (LoRA, DoRA): `docev train` → torchrun, 2 gloo ranks, CPU fp32, on the session's
training set (``train_data``, through test_recipe's ``data``). Runs: LoRA for 2 epochs; LoRA stopped after STOP_AT
steps and resumed; DoRA; one step of full fine-tuning on the same first batch (the loss that fresh adapters must
start from)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from test_recipe import _args, _ok, _out, _train, data  # noqa: F401 - data is the shared shards fixture
from torchtune.modules.peft import get_adapter_params

from docev.models.docev import DocEVCheckpointer, lora_docev_tiny
from docev.models.docev._folder import PEFT_META, TRAINED_FILE
from docev.run.checkpoints import latest_checkpoint
from docev.training.metrics_log import read_metrics

pytestmark = pytest.mark.slow  # five torchrun trainings (`make test-fast` leaves it out)

STEPS = 14  # 2 epochs × 7 steps, as test_recipe
STOP_AT = 6
LORA = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false",
        "model.apply_lora_to_mlp=true", "model.lora_rank=4", "model.lora_alpha=8", "optimizer.lr=1e-2"]  # fmt: skip


def _sha(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


RUNS = {  # name: overrides; "full": one step of full fine-tuning on the same first batch
    "lora": LORA,
    "dora": [*LORA, "model.use_dora=true", "epochs=1"],
    "full": ["epochs=1", "max_steps_per_epoch=1", "save_every_n_steps=1000"],
}


class _Runs(dict):
    """The module's runs, each trained when a test first asks for it (so ``-k`` trains only what it needs);
    ``base`` holds the base checkpoint's file hashes from before any run."""

    def __init__(self, shards: dict):
        super().__init__(base=_sha(shards["checkpoint"]))
        self.shards = shards

    def __missing__(self, name: str):
        shards = self.shards
        if name in ("split", "log"):  # stopped after STOP_AT steps, then resumed to the end
            split = _out(shards, "peft-lora-split")
            _ok(_train(_args(shards, split, *LORA, f"stop_after_steps={STOP_AT}")))
            resumed = _train(_args(shards, split, *LORA))
            _ok(resumed)
            self.update(split=split, log=resumed.stdout + resumed.stderr)
            return self[name]
        out = _out(shards, f"peft-{name}")  # the shards' root is the session's, shared with test_recipe's runs
        _ok(_train(_args(shards, out, *RUNS[name])))
        self[name] = out
        return out


@pytest.fixture(scope="module")
def peft_runs(data) -> dict:  # noqa: F811
    return _Runs(data)


def _expected_trained(**kwargs) -> set[str]:
    model = lora_docev_tiny(apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8, **kwargs)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in trainable}, set(
        get_adapter_params(model)
    )


@pytest.mark.parametrize("run, dora", [("lora", False), ("dora", True)])
def test_adapter_run_trains_adapters_and_chosen_groups_only(peft_runs, data, run, dora):  # noqa: F811
    out = peft_runs[run]
    losses = [r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl")]
    assert len(losses) == (STEPS if run == "lora" else STEPS // 2)
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 0.3, losses

    folder = latest_checkpoint(out / "checkpoints")
    trained = load_file(str(folder / TRAINED_FILE))
    expected, adapters = _expected_trained(use_dora=dora)
    fusion = {"image_newline", "tok_embeddings.fusion_embedding.weight"}
    assert set(trained) == expected and adapters <= expected and fusion <= expected
    assert expected - adapters == fusion | {k for k in expected if k.startswith("connector.")}
    assert any(k.endswith(".magnitude") for k in trained) == dora
    assert not any(k.startswith(("encoder.", "decoder.layers.0.attn.k_proj")) for k in trained)
    state = torch.load(folder / "recipe_state.pt", weights_only=True)
    assert set(state["optimizer"]["state"]) == expected  # no frozen base tensor in the optimizer
    # lora_b starts at zero and moved: the adapters trained
    assert trained["decoder.layers.0.attn.q_proj.lora_b.weight"].abs().sum() > 0
    meta = json.loads((folder / PEFT_META).read_text())
    assert meta["spec"]["rank"] == 4 and meta["spec"]["alpha"] == 8 and meta["spec"]["use_dora"] == dora
    assert meta["spec"]["targets"] == ["q_proj", "v_proj", "w1", "w2", "w3"]
    assert meta["spec"]["method"] == ("dora" if dora else "lora") and meta["spec"]["trained_groups"] == ["fusion"]
    assert _sha(data["checkpoint"]) == peft_runs["base"]  # the base checkpoint is read, never written
    with pytest.raises(ValueError, match="is a checkpoint of an adapter run"):
        DocEVCheckpointer(folder)


@pytest.mark.parametrize("run", ["lora", "dora"])
def test_fresh_adapters_start_from_the_full_models_loss(peft_runs, run):
    """``lora_b`` = 0 (DoRA: magnitudes = the base's row norms), so before any update the adapted model computes
    the base's function: its first loss equals full fine-tuning's on the same batch. A base loaded wrong
    (shifted, transposed, another checkpoint) changes it; "loss falls" and "exact resume" would not see that."""
    first, full = (read_metrics(peft_runs[r] / "logs" / "metrics.jsonl")[0] for r in (run, "full"))
    assert first["step"] == full["step"] == 1 and first["num_tokens"] == full["num_tokens"]  # the same batch
    assert first["loss"] == pytest.approx(full["loss"], rel=1e-6, abs=0)


def test_exact_resume_from_an_adapter_checkpoint(peft_runs):
    assert f"Resuming from {peft_runs['split'] / 'checkpoints' / f'step_{STOP_AT}'}" in peft_runs["log"]
    keys = ("step", "loss", "lr", "grad_norm", "num_tokens", "sampling_ratio", "tokens_seen")
    full, split = (read_metrics(peft_runs[r] / "logs" / "metrics.jsonl") for r in ("lora", "split"))
    assert [[r[k] for k in keys] for r in split] == [[r[k] for k in keys] for r in full]
    a, b = (peft_runs[r] / "checkpoints" / f"step_{STEPS}" for r in ("lora", "split"))
    ta, tb = (load_file(str(f / TRAINED_FILE)) for f in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    oa, ob = (torch.load(f / "recipe_state.pt", weights_only=True)["optimizer"]["state"] for f in (a, b))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[p][k], ob[p][k]) for p in oa for k in oa[p])


def test_resume_refuses_other_adapter_settings(peft_runs, data):  # noqa: F811
    out = peft_runs["split"]
    proc = _train(_args(data, out, *LORA, "model.lora_rank=8", "resume_from_checkpoint=true"))
    assert proc.returncode != 0
    assert "rank: checkpoint 4, config 8" in proc.stdout + proc.stderr
