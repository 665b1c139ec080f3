"""``build_dataloader``: shards → sampler → collate → batches the recipe feeds to the model."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torchtune.config._utils import _get_component_from_path
from torchtune.modules.loss import CEWithChunkedOutputLoss

from docev.config import DocEVConfig
from docev.data.collate import DocEVCollate
from docev.data.dataset import ShardDataset
from docev.data.preprocess import config_hash, tokenizer_fingerprint
from docev.data.sampler import DocEVBatchSampler
from docev.data.shards import ShardError
from docev.data.staging import local_shards
from docev.data.transform import transform_from_config
from docev.outputs import outputs
from docev.run.paths import shards_manifest_key


def build_collate(cfg: DocEVConfig, dtype: torch.dtype, normalize: bool = True) -> DocEVCollate:
    transform = transform_from_config(cfg)
    tok = cfg.tokenizer
    return DocEVCollate(
        image_token_id=transform.image_token_id, pad_id=transform.tokenizer.pad_token_id or 0,
        tile_size=tok.tile_size, patch_size=tok.patch_size, min_num_tiles=tok.min_num_tiles,
        max_num_tiles=tok.max_num_tiles, max_seq_len=tok.max_seq_len, mean=transform.pixels.mean,
        std=transform.pixels.std, dtype=dtype, packed=cfg.dataloader.packed, normalize=normalize,
        pad_to_multiple_of=cfg.dataloader.pad_to_multiple_of, num_output_chunks=num_output_chunks(cfg),
    )  # fmt: skip


def num_output_chunks(cfg: DocEVConfig) -> int:
    """The chunks the loss splits the output into (``CEWithChunkedOutputLoss``), else 1."""
    loss = _get_component_from_path(cfg.loss.component)
    if isinstance(loss, type) and issubclass(loss, CEWithChunkedOutputLoss):
        return int((cfg.loss.model_extra or {}).get("num_output_chunks", 8))
    return 1


def build_dataset(cfg: DocEVConfig, verify_share: tuple[int, int] | None = None) -> ShardDataset:
    """The run's shards, refused when built with another config or tokenizer, or when corrupt (with
    ``verify_share``, this rank's part of the checksums is listed in ``dataset.corrupt``, see ShardDataset)."""
    expect = {"config_hash": config_hash(cfg), "tokenizer": tokenizer_fingerprint(cfg.tokenizer.model_name_or_path)}
    folder = local_shards(cfg)
    if folder is None:
        raise ShardError(f"{outputs(cfg).where(shards_manifest_key())} not found: run `docev preprocess` first")
    return ShardDataset(folder, tile_size=cfg.tokenizer.tile_size, expect=expect,
                        verify_checksums=cfg.dataloader.verify_checksums, verify_share=verify_share)  # fmt: skip


def verified_dataset(cfg: DocEVConfig, *, rank: int, world_size: int) -> ShardDataset:
    """``build_dataset`` on every rank of a process group, each rank hashing 1/world_size of the shards;
    every rank raises the same error, naming every corrupt shard, when any rank found one."""
    if world_size == 1 or not dist.is_initialized():
        return build_dataset(cfg)
    dataset = build_dataset(cfg, verify_share=(rank, world_size))
    found: list[list[str] | None] = [None] * world_size
    dist.all_gather_object(found, dataset.corrupt)
    problems = [p for part in found for p in part]
    if problems:
        raise ShardError("; ".join(problems))
    return dataset


def build_sampler(cfg: DocEVConfig, dataset: ShardDataset, *, rank: int, world_size: int) -> DocEVBatchSampler:
    tok, dl = cfg.tokenizer, cfg.dataloader
    return DocEVBatchSampler(
        dataset.lengths(), dataset.source_indices(), [d.weight for d in cfg.datasets],
        batch_size=cfg.batch_size, max_seq_len=tok.max_seq_len, ratios=tok.sampling_ratio,
        random_ratio=tok.apply_random_sampling_ratio, num_replicas=world_size, rank=rank, seed=cfg.seed,
        shuffle=dl.shuffle, bucket_by_length=dl.bucket_by_length, packed=dl.packed,
    )  # fmt: skip


def build_dataloader(
    cfg: DocEVConfig, *, rank: int, world_size: int, dtype: torch.dtype = torch.float32, normalize: bool = True
) -> tuple[DataLoader, DocEVBatchSampler]:
    """The loader and its sampler (the recipe saves/restores ``sampler.state_dict()`` to resume exactly).
    ``normalize=False``: ``pixel_values`` stay uint8; the consumer calls ``loader.collate_fn.normalize_pixels``
    after moving them to the device."""
    dataset = verified_dataset(cfg, rank=rank, world_size=world_size)
    sampler = build_sampler(cfg, dataset, rank=rank, world_size=world_size)
    dl = cfg.dataloader
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=build_collate(cfg, dtype, normalize), num_workers=dl.num_workers,
        pin_memory=dl.pin_memory, prefetch_factor=dl.prefetch_factor if dl.num_workers else None,
    )  # fmt: skip
    return loader, sampler
