"""Export tensors: frozen groups from the base bit for bit, trained groups from the checkpoint, dtype asked."""

import pytest
import torch

from docev.config import ModelSection
from docev.models.docev import DocEVCheckpointer, docev_tiny, hf_param_shapes, tiny
from docev.models.docev._convert_weights import is_unused

from .conftest import folder_tensors, perturb

DEFAULT = ModelSection()  # decoder + fusion trained, encoder frozen


def test_frozen_keys_follow_the_flags_and_state_dict_names():
    from docev.export import frozen_state_keys

    state_keys = set(docev_tiny().state_dict())
    default = set(frozen_state_keys(tiny(), DEFAULT))
    assert default == {k for k in state_keys if k.startswith("encoder.")}
    everything = set(frozen_state_keys(tiny(), ModelSection(encoder_trainable=True)))
    assert everything == {"encoder.post_norm.weight", "encoder.post_norm.bias"} | {
        k for k in state_keys if k.startswith(f"encoder.layers.{tiny().vision_layers - 1}.")
    }  # never run, so never trained
    no_decoder = set(frozen_state_keys(tiny(), ModelSection(decoder_trainable=False)))
    # FusionEmbedding's base rows: parameter tok_embeddings.embedding.weight, state-dict key tok_embeddings.weight
    assert "tok_embeddings.weight" in no_decoder and "tok_embeddings.fusion_embedding.weight" not in no_decoder
    assert no_decoder <= state_keys and "decoder.output.weight" in no_decoder


def test_untrained_export_is_the_base_bit_for_bit(tiny_checkpoint):
    from docev.export import export_tensors

    tensors, arch = export_tensors(tiny_checkpoint, tiny_checkpoint, DEFAULT, torch.float32)
    base = folder_tensors(tiny_checkpoint)
    assert arch == tiny() and list(tensors) == list(hf_param_shapes(arch))  # every key, the released order
    assert set(tensors) == set(base)
    for key, value in base.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key


def test_bf16_training_of_an_fp32_base(tiny_checkpoint, tmp_path):
    """Frozen groups come back as the fp32 base, not as their bf16 training copies; trained ones from the step."""
    from docev.export import export_tensors

    ckpt = DocEVCheckpointer(tiny_checkpoint, output_dir=tmp_path)
    trained = {k: v.to(torch.bfloat16) for k, v in perturb(ckpt.load_checkpoint()["model"]).items()}
    step = ckpt.save_checkpoint({"model": trained}, step=2)
    stored = folder_tensors(step)
    base = folder_tensors(tiny_checkpoint)
    tensors, _ = export_tensors(step, tiny_checkpoint, DEFAULT, torch.float32)
    vision = [k for k in base if k.startswith("vision_tower.")]
    assert any(is_unused(k) for k in vision) and stored[vision[0]].dtype == torch.bfloat16
    for key in vision:  # encoder, its unused last layer and head.*: the base's fp32 bits
        assert torch.equal(tensors[key], base[key]), key
    for key in ("language_model.lm_head.weight", "multi_modal_projector.peg.0.weight", "image_newline"):
        assert tensors[key].dtype == torch.float32 and torch.equal(tensors[key], stored[key].float()), key
        assert not torch.equal(tensors[key], base[key])
    bf16, _ = export_tensors(step, tiny_checkpoint, DEFAULT, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], stored[k].to(torch.bfloat16)) for k in stored)


def test_changed_frozen_tensor_stops_the_export(tiny_checkpoint, tmp_path):
    from docev.export import ExportError, export_tensors

    ckpt = DocEVCheckpointer(tiny_checkpoint, output_dir=tmp_path)
    state = ckpt.load_checkpoint()["model"]
    state["encoder.layers.0.attn.q_proj.weight"] = state["encoder.layers.0.attn.q_proj.weight"] + 1e-3
    step = ckpt.save_checkpoint({"model": state}, step=1)
    with pytest.raises(ExportError, match=r"frozen tensor encoder\.layers\.0\.attn\.q_proj\.weight differs"):
        export_tensors(step, tiny_checkpoint, DEFAULT, torch.float32)
    # with the encoder trained, the same checkpoint is consistent
    tensors, _ = export_tensors(step, tiny_checkpoint, ModelSection(encoder_trainable=True), torch.float32)
    key = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(tensors[key], folder_tensors(step)[key])
