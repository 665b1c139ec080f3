"""Packed rows: a dense S × S mask (before) against per-token document ids (after).

1. Host side, per packed 8192-token row of 7 documents: bytes the collate builds and the loader copies to the
   device, and collate time. Before = the collate as it was (a [B, S, S] bool block-causal mask built on the
   host); after = ``DocEVCollate`` shipping ``document_ids`` (int32) from which the model builds its mask on
   the device.
2. Attention forward on CPU at S = 1024 / 2048 / 4096 (5 documents a row; 8 heads of 128, fewer than the 32 of
   the preview decoder to keep CPU time short; same for both): SDPA with the dense mask against flex attention
   with the ``BlockMask`` (compiled; CPU flex has no backward). The GPU numbers come from benchmarks/gpu_check.sh.

    .venv/bin/python benchmarks/attention_mask.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from docev.data.collate import DocEVCollate
from docev.models.docev._attention import attention_call, dense_document_mask, document_block_mask

S_ROW = 8192
ROW_DOCS = [1500, 900, 2000, 700, 1200, 1100, 792]


def _samples(lengths: list[int]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(1, 60000, (n,), generator=gen).tolist() for n in lengths]
    return [{"id": f"s{i}", "ratio": 2, "row": 0, "tokens": t, "loss_mask": [True] * len(t), "image_sizes": [],
             "image_grids": [], "images": []} for i, t in enumerate(tokens)]  # fmt: skip


def dense_mask_as_before(lengths: list[int], s_len: int) -> torch.Tensor:
    """The collate's mask before document ids: block-causal tril per document, padding attends to itself."""
    mask = torch.zeros(1, s_len, s_len, dtype=torch.bool)
    start = 0
    for n in lengths:
        mask[0, start : start + n, start : start + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        start += n
    idx = torch.arange(start, s_len)
    mask[0, idx, idx] = True
    return mask


def _best(fn, repeats: int, *args) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def host_side(repeats: int) -> None:
    collate = DocEVCollate(image_token_id=64000, pad_id=0, tile_size=560, patch_size=14, min_num_tiles=1,
                           max_num_tiles=9, max_seq_len=S_ROW, mean=(0.5,) * 3, std=(0.5,) * 3, packed=True,
                           num_output_chunks=8)  # fmt: skip
    samples = _samples(ROW_DOCS)
    batch = collate(samples)
    after_bytes = batch["document_ids"].numel() * batch["document_ids"].element_size()
    before_mask = dense_mask_as_before(ROW_DOCS, S_ROW)
    before_bytes = before_mask.numel() * before_mask.element_size()
    t_after = _best(lambda: collate(samples), repeats)
    t_before = _best(lambda: (collate(samples), dense_mask_as_before(ROW_DOCS, S_ROW)), repeats)
    assert torch.equal(dense_document_mask(batch["document_ids"])[0, : sum(ROW_DOCS)],
                       before_mask[0, : sum(ROW_DOCS)])  # fmt: skip
    print(f"packed row of {S_ROW} tokens, {len(ROW_DOCS)} documents (input_pos, tokens, labels: the same in both)")
    print(
        f"  mask bytes on the host / copied per row: before {before_bytes / 2**20:.1f} MiB (bool S x S), "
        f"after {after_bytes / 2**10:.1f} KiB (int32 ids)  ->  {before_bytes / after_bytes:.0f}x fewer"
    )
    print(
        f"  collate time per row: before {t_before * 1e3:.1f} ms, after {t_after * 1e3:.1f} ms  ->  "
        f"{t_before / t_after:.1f}x faster"
    )


def attention(repeats: int) -> None:
    heads, head_dim = 8, 128
    threads = torch.get_num_threads()
    print(f"\nattention forward on CPU, {threads} threads, {heads} heads x {head_dim}, fp32, 5 documents a row")
    print(f"{'S':>6} {'SDPA dense mask':>16} {'flex BlockMask':>15} {'ratio':>7} {'blocks computed':>16}")
    for s in (1024, 2048, 4096):
        lengths = [s // 5] * 4 + [s - 4 * (s // 5)]
        docs = torch.cat([torch.full((n,), d, dtype=torch.int32) for d, n in enumerate(lengths)])[None]
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, s, head_dim, generator=gen) for _ in range(3))
        dense, block = dense_document_mask(docs), document_block_mask(docs)
        with torch.no_grad():
            ref = attention_call(q, k, v, dense, 0.0, False)
            got = attention_call(q, k, v, block, 0.0, False)  # compiles flex for this S
            err = (got - ref).abs().max().item()
            t_dense = _best(attention_call, repeats, q, k, v, dense, 0.0, False)
            t_flex = _best(attention_call, repeats, q, k, v, block, 0.0, False)
        # the two compute the same attention (measured 1.4e-6 in fp32): a speed-up of a wrong mask is no speed-up
        assert err < 1e-5, f"S = {s}: flex differs from the dense mask by {err:.1e}"
        n_blocks = -(-s // block.BLOCK_SIZE[0])
        share = block.sparsity()
        print(f"{s:6d} {t_dense * 1e3:13.1f} ms {t_flex * 1e3:12.1f} ms {t_dense / t_flex:6.2f}x "
              f"{100 - share:8.1f}% of {n_blocks}^2  (max |flex - dense| {err:.1e})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    host_side(args.repeats)
    attention(args.repeats)


if __name__ == "__main__":
    main()
