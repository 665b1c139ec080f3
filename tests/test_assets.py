import hashlib
import json
import math

import pytest
from safetensors import safe_open
from transformers import AutoTokenizer

from docev.assets import init_checkpoint
from docev.models.arch import hf_param_shapes, preview, siglip_head_shapes, tiny


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = fh.get_tensor(k)
    return out


def test_tiny_checkpoint_layout_matches_design(tiny_checkpoint):
    tensors = _tensors(tiny_checkpoint)
    expected = hf_param_shapes(tiny())
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    # the DESIGN §4 prefixes are all present, the SigLIP head included
    for prefix in (
        "vision_tower.vision_model.embeddings.patch_embedding.bias",
        "multi_modal_projector.mlp.0.weight",
        "multi_modal_projector.mlp.2.bias",
        "multi_modal_projector.peg.0.weight",
        "image_newline",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
        "vision_tower.vision_model.head.probe",
        "vision_tower.vision_model.post_layernorm.weight",
    ):
        assert prefix in tensors
    assert tensors["multi_modal_projector.peg.0.weight"].shape == (128, 1, 3, 3)  # depthwise


def test_index_file_and_shards_agree(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tiny_checkpoint.glob("model-*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    tensors = _tensors(tiny_checkpoint)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for key, fname in index["weight_map"].items():
        with safe_open(str(tiny_checkpoint / fname), "pt") as fh:
            assert key in fh.keys()  # noqa: SIM118 - safe_open is not a dict


def test_checkpoint_is_deterministic_for_a_seed(tmp_path, tiny_checkpoint):
    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    again = init_checkpoint(tmp_path / "again", seed=0)
    assert digest(again) == digest(tiny_checkpoint)
    other = init_checkpoint(tmp_path / "other", seed=1)
    assert (
        digest(other)["model-00001-of-00004.safetensors"] != digest(tiny_checkpoint)["model-00001-of-00004.safetensors"]
    )


def test_preview_layout_size():
    shapes = hf_param_shapes(preview())
    total = sum(math.prod(s) for s in shapes.values())
    head = sum(math.prod(s) for s in siglip_head_shapes(preview()).values())
    assert total - head == 11_429_732_080  # the released model's parameters; head.* is carried, unused
    assert shapes["language_model.model.embed_tokens.weight"] == (64064, 4096)
    assert shapes["language_model.lm_head.weight"] == (64064, 4096)
    assert shapes["vision_tower.vision_model.embeddings.position_embedding.weight"] == (1600, 1152)
    assert shapes["vision_tower.vision_model.embeddings.patch_embedding.weight"] == (1152, 3, 14, 14)
    assert shapes["multi_modal_projector.mlp.0.weight"] == (4096, 1152)
    assert shapes["multi_modal_projector.peg.0.weight"] == (4096, 1, 3, 3)
    assert shapes["image_newline"] == (4096,)
    assert preview().image_token_id == 64000


def test_config_json_describes_the_weights(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["image_token_index"] == 1024 and cfg["vision_feature_layer"] == -2
    assert cfg["text_config"]["vocab_size"] == 1088 and cfg["vision_config"]["image_size"] == 112
    assert [112, 336] in cfg["image_grid_pinpoints"] and [112, 1120] not in cfg["image_grid_pinpoints"]
    pre = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.5] * 3 and pre["resample"] == 3


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(str(tiny_checkpoint), local_files_only=True)


def test_tokenizer_special_tokens_and_round_trip(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<image>", "<|im_start|>", "<|im_end|>", "<pad>", "<s>", "</s>"])
    assert ids[0] == 1024 and len(set(ids)) == 6 and all(i < 1024 for i in ids[1:])
    for text in ["Invoice INV-4821 Total: $1,234.56", "Grüße aus Köln — 東京", "<image>\nWhat is the total?"]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.encode("<image>", add_special_tokens=False) == [1024]


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>\nTotal?"},
    {"role": "assistant", "content": "$12.00"},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
    {"role": "assistant", "content": "$3.50"},
]


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nTotal?<|im_end|>\n"
        "<|im_start|>assistant\n$12.00<|im_end|>\n<|im_start|>user\n<image>And this one?<|im_end|>\n"
        "<|im_start|>assistant\n$3.50<|im_end|>\n"
    )
    with_ids = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_vision_id=True,
                                             add_generation_prompt=True)  # fmt: skip
    assert "Picture 1: <image>\nTotal?" in with_ids and "Picture 2: <image>And" in with_ids
    assert with_ids.endswith("<|im_start|>assistant\n") and not with_ids.startswith("<s>")


def test_generation_block_marks_assistant_text(tokenizer):
    out = tokenizer.apply_chat_template(MESSAGES, return_assistant_tokens_mask=True, return_dict=True)
    marked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(marked) == "$12.00$3.50"
