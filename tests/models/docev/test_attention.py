"""Packed rows: the document-id masks (dense and flex) against torchtune's block-causal mask and against running
each document alone; unpacked batches reach attention with no mask."""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from torchtune.modules.attention_utils import create_block_causal_mask
from torchtune.modules.loss import CEWithChunkedOutputLoss

from docev.models.docev._attention import (
    attended_pairs,
    dense_document_mask,
    document_block_mask,
    document_mask,
    use_flex,
)

from .conftest import ARCH

LENS = [[20, 33, 11, 8], [40, 32]]  # per row; the last 8 of row 0 stand for padding (its own document)
# S = 640, five of flex's 128-token blocks: row 0's documents straddle block boundaries (a 300-token one spans
# three blocks, two partially), row 1's first two end on boundaries (whole blocks) and its last ones do not;
# the last 50 of row 0 stand for padding.
LONG = [[100, 300, 190, 50], [128, 256, 200, 56]]


def _packed(seed=0, lens=LENS):
    gen = torch.Generator().manual_seed(seed)
    s = sum(lens[0])
    tokens = torch.randint(0, ARCH.vocab_size, (len(lens), s), generator=gen)
    docs = torch.stack([torch.cat([torch.full((n,), d, dtype=torch.int32) for d, n in enumerate(row)]) for row in lens])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lens])
    return tokens, docs, pos


def test_dense_mask_is_torchtunes_block_causal_mask():
    _, docs, _ = _packed()
    expected = create_block_causal_mask([torch.tensor(row) for row in LENS])
    assert torch.equal(dense_document_mask(docs), expected)


@pytest.mark.parametrize("lens", [LENS, LONG], ids=["one-block", "640-straddling"])
def test_block_mask_marks_the_same_pairs_as_the_dense_mask(lens):
    _, docs, _ = _packed(lens=lens)
    block = document_block_mask(docs)
    s = docs.shape[1]
    assert isinstance(block, BlockMask) and block.shape == (2, 1, s, s)
    b, q, k = torch.meshgrid(*(torch.arange(n) for n in (2, s, s)), indexing="ij")
    dense = dense_document_mask(docs)
    assert torch.equal(block.mask_mod(b, 0, q, k), dense)
    # and the blocks it visits hold every allowed pair (flex skips the others without looking at them)
    size = block.BLOCK_SIZE[0]
    visited = block.to_dense()[:, 0].repeat_interleave(size, 1).repeat_interleave(size, 2)[:, :s, :s].bool()
    assert not (dense & ~visited).any()


def test_auto_is_dense_on_cpu():
    _, docs, _ = _packed()
    assert not use_flex("auto", torch.device("cpu")) and use_flex("flex", torch.device("cpu"))
    assert isinstance(document_mask(docs, "auto"), torch.Tensor)
    assert isinstance(document_mask(docs, "flex"), BlockMask)


def test_packed_rows_match_each_document_alone(tiny_model):
    tokens, docs, pos = _packed()
    with torch.no_grad():
        packed = tiny_model(tokens, document_ids=docs, input_pos=pos)
        for r, row in enumerate(LENS):
            start = 0
            for n in row:
                alone = tiny_model(tokens[r : r + 1, start : start + n])  # no mask: is_causal
                torch.testing.assert_close(packed[r, start : start + n], alone[0], atol=2e-5, rtol=1e-5)
                start += n


@pytest.mark.slow  # compiles flex attention on CPU (a minute or two on 2 cores; `make test-fast` leaves it out)
def test_flex_matches_dense_on_packed_rows_including_the_loss(tiny_model):
    """Flex attention compiled on CPU (forward only: flex has no CPU backward) against the dense mask, over
    five 128-token blocks with documents inside one block, on whole blocks and across block boundaries
    (inside one block alone, a mask wrong only between blocks would pass)."""
    tokens, docs, pos = _packed(seed=1, lens=LONG)
    labels = torch.randint(0, ARCH.vocab_size, tokens.shape)
    labels[0, -LONG[0][-1] :] = -100  # padding
    loss_fn = CEWithChunkedOutputLoss()
    tiny_model.set_num_output_chunks(loss_fn.num_output_chunks)
    out = {}
    with torch.no_grad():
        for kind in ("sdpa", "flex"):
            tiny_model.attention = kind
            chunks = tiny_model(tokens, document_ids=docs, input_pos=pos)
            out[kind] = (torch.cat(chunks, dim=1), loss_fn(chunks, labels))
    torch.testing.assert_close(out["flex"][0], out["sdpa"][0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["flex"][1], out["sdpa"][1], atol=1e-6, rtol=1e-6)
    assert out["sdpa"][1].isfinite()


@pytest.mark.parametrize("attention", ["auto", "sdpa", "flex"])
def test_unpacked_batches_reach_attention_without_a_mask(tiny_model, make_batch, attention, monkeypatch):
    """Right-padded rows: every decoder layer's attention gets mask=None and is_causal=True (SDPA's flash path)."""
    seen = []
    for layer in tiny_model.decoder.layers:
        call = layer.attn._attention_call

        def spy(q, k, v, mask, dropout_p, is_causal, _call=call):
            seen.append((mask, is_causal))
            return _call(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)

        monkeypatch.setattr(layer.attn, "_attention_call", spy)
    tiny_model.attention = attention
    with torch.no_grad():
        tiny_model(**make_batch([[(100, 150)], []], ratio=2))
    assert seen == [(None, True)] * len(tiny_model.decoder.layers)


def test_mask_and_document_ids_together_are_refused(tiny_model):
    tokens, docs, pos = _packed()
    with pytest.raises(ValueError, match="either mask or document_ids"):
        tiny_model(tokens, mask=dense_document_mask(docs), document_ids=docs, input_pos=pos)


@pytest.mark.parametrize("lens", [[300, 200, 12], [128, 128, 256], [640]])
def test_attended_pairs_are_the_masks_allowed_pairs(lens):
    """MFU's attention count: the pairs the document mask allows among real tokens (padding attends nothing
    useful), the same count for a packed row and for the documents as unpacked rows padded to 640."""
    s = 640
    docs = torch.cat([torch.full((n,), d, dtype=torch.int32) for d, n in enumerate(lens)])
    real = docs.numel()
    docs = torch.cat([docs, torch.full((s - real,), -1, dtype=torch.int32)])[None]
    assert attended_pairs(lens) == int(dense_document_mask(docs)[0, :real, :real].sum())
    assert attended_pairs(lens) == sum(attended_pairs([n]) for n in lens)
