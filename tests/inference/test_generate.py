"""Greedy generation: KV-cached decoding gives exactly the tokens of full recomputation; stop and
suppressed tokens; prompts built by the training transform and collate."""

import pytest
import torch

from docev.inference import DocEVGenerator, greedy_generate
from docev.inference.generate import last_position_logits
from docev.vision.geometry import num_image_tokens


@pytest.fixture(scope="module")
def generator(step_checkpoint):
    return DocEVGenerator(step_checkpoint)


@pytest.fixture(scope="module")
def pages(synth_sources):
    return sorted((synth_sources["instruct"] / "images").glob("*"))


def test_prompt_is_the_training_format(generator, pages):
    inputs = generator.prepare(pages[:2], "What is the total?", sampling_ratio=3)
    tokens = inputs["tokens"][0].tolist()
    arch, image_id = generator.arch, generator.transform.image_token_id
    counts = [num_image_tokens(h, w, 3, tile_size=arch.tile_size, patch_size=arch.patch_size)
              for h, w in inputs["image_sizes"].tolist()]  # fmt: skip
    assert tokens.count(image_id) == sum(counts) and inputs["pixel_values"].shape[0] == 2
    text = generator.transform.tokenizer.decode([t for t in tokens if t != image_id])
    assert text == "<|im_start|>user\n\n\nWhat is the total?<|im_end|>\n<|im_start|>assistant\n"
    assert inputs["pixel_values"].dtype == torch.float32 and inputs["sampling_ratio"] == 3


@pytest.mark.parametrize("ratio", [2, 3])
def test_cached_equals_uncached(generator, pages, ratio):
    inputs = generator.prepare(pages[1:2], "Who issued this invoice?", sampling_ratio=ratio)
    tokens = inputs.pop("tokens")
    kwargs = {"max_new_tokens": 12, "stop_token_ids": generator.stop_token_ids,
              "suppress_token_ids": generator.suppress_token_ids, **inputs}  # fmt: skip
    cached, stopped = greedy_generate(generator.model, tokens, use_cache=True, **kwargs)
    full, full_stopped = greedy_generate(generator.model, tokens, use_cache=False, **kwargs)
    assert cached == full and stopped == full_stopped
    assert len(set(cached)) >= 3  # not one token repeated: the comparison can tell positions apart
    assert not generator.model.caches_are_setup()  # caches are dropped after each generation


def test_prefill_computes_the_last_position_only(generator, pages):
    """The prefill's logits are the whole sequence's last row, computed for that position alone."""
    inputs = generator.prepare(pages[:2], "What is the total?", sampling_ratio=2)
    tokens = inputs.pop("tokens")
    with torch.inference_mode():
        full = generator.model(tokens, **inputs)
        with last_position_logits(generator.model):
            last = generator.model(tokens, **inputs)
        after = generator.model(tokens, **inputs)
    assert last.shape == (1, 1, full.shape[-1]) and torch.allclose(last[:, 0], full[:, -1], rtol=0, atol=1e-5)
    assert after.shape == full.shape  # the hook is gone after the block


def test_stop_and_suppressed_tokens(step_checkpoint, pages):
    generator = DocEVGenerator(step_checkpoint)
    stop, image = generator.stop_token_ids[0], generator.transform.image_token_id
    assert generator.stop_token_ids == [generator.transform.tokenizer.backend_tokenizer.token_to_id("<|im_end|>")]
    boost: list[int] = []

    def favour(module, inputs, logits):  # the boosted tokens' logits win at every position
        logits = logits.clone()
        logits[..., boost] += 1e4
        return logits

    handle = generator.model.decoder.output.register_forward_hook(favour)
    try:
        boost.append(image)  # <image> would win every step; it has no image to fill, so it is never chosen
        suppressed = generator.generate(pages[:1], "Total?", max_new_tokens=6)
        assert image not in suppressed.token_ids and len(suppressed.token_ids) == 6 and not suppressed.stopped
        boost.append(stop)
        ended = generator.generate(pages[:1], "Total?", max_new_tokens=6)
    finally:
        handle.remove()
    assert ended.token_ids == [stop] and ended.stopped and ended.text == ""


def test_generation_limits(generator, pages):
    limit = generator.model.decoder.max_seq_len
    inputs = generator.prepare(pages[:1], "Total?", sampling_ratio=2)
    tokens = inputs.pop("tokens")
    with pytest.raises(ValueError, match=f"exceeds the model's max_seq_len {limit}"):
        greedy_generate(generator.model, tokens, max_new_tokens=limit, stop_token_ids=[], **inputs)
    with pytest.raises(ValueError, match="one prompt"):
        greedy_generate(generator.model, tokens.repeat(2, 1), max_new_tokens=2, stop_token_ids=[], **inputs)
    with pytest.raises(ValueError, match="sampling_ratio 9 outside 1..8"):
        generator.prepare(pages[:1], "Total?", sampling_ratio=9)
    with pytest.raises(ValueError, match="must not contain it"):
        generator.prepare(pages[:1], "<image> again?", sampling_ratio=2)


def test_bf16_generation(step_checkpoint, pages):
    """Cached and uncached also agree when the model runs in bf16."""
    generator = DocEVGenerator(step_checkpoint, dtype=torch.bfloat16)
    assert generator.model.image_newline.dtype == torch.bfloat16
    a = generator.generate(pages[:1], "Total?", max_new_tokens=8)
    b = generator.generate(pages[:1], "Total?", max_new_tokens=8, use_cache=False)
    assert a.token_ids == b.token_ids


def test_batched_equals_one_at_a_time(generator, pages, synth_sources):
    """Several prompts of different lengths and image counts in one padded batch give each prompt's own ids."""
    from torchtune.data import Message

    def conv(images, question):
        parts = [p for im in images for p in ({"type": "image", "content": im}, {"type": "text", "content": "\n"})]
        return [Message(role="user", content=[*parts, {"type": "text", "content": question}])]

    convs = [conv(pages[:1], "Total?"), conv(pages[1:3], "Who issued the first invoice on this page?"),
             conv(pages[3:4], "What name is written on the form, and in which city?"), conv([], "Hello")]  # fmt: skip
    batched = generator.generate_batch(convs, max_new_tokens=10, sampling_ratio=2)
    alone = [generator.generate_batch([c], max_new_tokens=10, sampling_ratio=2)[0] for c in convs]
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert len({tuple(g.token_ids) for g in alone}) > 1 and len({g.prompt_tokens for g in alone}) == 4
    first = generator.generate(pages[:1], "Total?", max_new_tokens=10, sampling_ratio=2, use_cache=False)
    assert batched[0].token_ids == first.token_ids and batched[0].text == first.text


def test_cli_says_when_the_answer_is_the_stop_token(step_checkpoint, pages, monkeypatch, capsys):
    from docev.cli import main
    from docev.inference import Generation
    from docev.inference.generate import NO_TEXT

    monkeypatch.setattr(DocEVGenerator, "generate", lambda self, *a, **k: Generation("", [7], 40, True, 2))
    assert main(["generate", "--model", str(step_checkpoint), "--image", str(pages[0]), "--prompt", "x"]) == 0
    assert capsys.readouterr().out == f"{NO_TEXT}\n"
