"""DocEV early fusion: tiles -> vision tower -> LDPv2 -> LLaVA-NeXT packing -> ``<image>`` slots.

The decoder is a plain torchtune ``TransformerDecoder``; like torchtune's ``EarlyFusionModel`` its
token embedding (a ``FusionEmbedding``: base rows + 64 trainable fusion rows) moves up to this
module so image features can replace the ``<image>`` positions before the first layer. Our own
class instead of ``EarlyFusionModel`` because the number of features per image varies (anyres
grid, unpad, per-batch sampling ratio) and every mismatch must name the sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torchtune.modules import TransformerDecoder
from torchtune.modules.model_fusion import get_fusion_params
from torchtune.modules.peft import get_adapter_params

from docev.models.docev._attention import AttentionKind, document_mask
from docev.models.docev._connector import LDPv2Connector
from docev.models.docev._vision import SiglipVisionEncoder
from docev.vision.geometry import packed_grid, pooled_side, unpad_shape


def image_feature_counts(
    image_sizes: Sequence[Sequence[int]], image_grids: Sequence[Sequence[int]], side: int
) -> list[int]:
    """Features per image: base tile side² + unpadded rows × (cols + 1), from the shared geometry."""
    counts = []
    for (h, w), grid in zip(image_sizes, image_grids, strict=True):
        rows, cols = packed_grid(h, w, tuple(grid), side)
        counts.append(side * side + rows * (cols + 1))
    return counts


def image_positions(tokens: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Flat indices (into ``tokens.flatten()``) of the ``<image>`` slots, in order: where the packed image
    features go. The recipe computes them on the host copy of the tokens and ships them with the batch, so the
    forward places features by index on the device (``masked_scatter`` would read the mask back: ``nonzero``
    in its backward)."""
    return (tokens.flatten() == image_token_id).nonzero().flatten()


def _as_pairs(values: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    """Image sizes or grids as Python ints (a tensor on the device would cost a host sync per read)."""
    return values.tolist() if isinstance(values, torch.Tensor) else [list(v) for v in values]


def pack_image_features(
    tile_features: Sequence[torch.Tensor],
    image_sizes: Sequence[Sequence[int]],
    image_grids: Sequence[Sequence[int]],
    image_newline: torch.Tensor,
) -> torch.Tensor:
    """LLaVA-NeXT arrangement of each image's pooled tiles, concatenated over images.

    ``tile_features[i]`` is [1 + rows·cols, s, s, d] (base tile first, then the grid row-major).
    Per image: base s² features, then the grid as a (rows·s, cols·s) map, unpadded to the
    image's aspect ratio, each row followed by ``image_newline``. Returns [Σ features, d].
    """
    packed = []
    for feats, (h, w), (rows, cols) in zip(tile_features, image_sizes, image_grids, strict=True):
        s, d = feats.shape[1], feats.shape[-1]
        base = feats[0].reshape(s * s, d)
        grid = feats[1:].view(rows, cols, s, s, d).permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, d)
        top, bottom, left, right = unpad_shape(h, w, rows * s, cols * s)
        grid = grid[top:bottom, left:right]
        newline = image_newline.to(grid.dtype).expand(grid.shape[0], 1, d)
        packed += [base, torch.cat([grid, newline], dim=1).reshape(-1, d)]
    return torch.cat(packed)


class DocEVModel(nn.Module):
    """Vision tower + LDPv2 connector + ``image_newline`` + Llama decoder, fused at the input.

    Parameter groups (see ``set_trainable``):
      - ``decoder``: ``decoder.*`` and the base embedding rows ``tok_embeddings.embedding.weight``
        (state-dict key ``tok_embeddings.weight``);
      - ``encoder``: ``encoder.*`` except its last layer and final norm, which are never run and so
        always frozen;
      - ``fusion``: ``connector.*``, ``image_newline`` and ``tok_embeddings.fusion_embedding.weight``
        (exactly what torchtune's ``get_fusion_params`` finds).

    Args:
        decoder (TransformerDecoder): decoder whose ``tok_embeddings`` is a ``FusionEmbedding``.
        encoder (SiglipVisionEncoder): vision tower.
        connector (LDPv2Connector): registered as a fusion module.
        image_token_id (int): the ``<image>`` id in token sequences.
        tile_size (int): tile side in pixels.
        patch_size (int): vision patch side in pixels.
        decoder_trainable (bool): train the decoder group.
        encoder_trainable (bool): train the vision tower.
        fusion_trainable (bool): train the fusion group.
        attention (AttentionKind): mask of packed rows, ``auto`` (flex on CUDA ≥ sm75, else dense), ``sdpa``
            (dense mask) or ``flex`` (``BlockMask``); see ``_attention.py``.
    """

    def __init__(
        self,
        decoder: TransformerDecoder,
        encoder: SiglipVisionEncoder,
        connector: LDPv2Connector,
        *,
        image_token_id: int,
        tile_size: int,
        patch_size: int,
        decoder_trainable: bool = True,
        encoder_trainable: bool = False,
        fusion_trainable: bool = True,
        attention: AttentionKind = "auto",
    ):
        super().__init__()
        self.tok_embeddings = decoder.tok_embeddings
        decoder.tok_embeddings = nn.Identity()
        vocab = self.tok_embeddings.num_embeddings
        if not 0 <= image_token_id < vocab:
            raise ValueError(f"image_token_id {image_token_id} outside the embedding's 0..{vocab - 1}")
        self.decoder = decoder
        self.encoder = encoder
        self.connector = connector
        self.image_newline = nn.Parameter(torch.empty(self.tok_embeddings.dim))
        nn.init.normal_(self.image_newline, std=self.tok_embeddings.dim**-0.5)
        self.image_token_id = image_token_id
        self.tile_size = tile_size
        self.patch_size = patch_size
        self.attention = attention
        self.set_trainable(decoder=decoder_trainable, encoder=encoder_trainable, fusion=fusion_trainable)

    def fusion_params(self) -> list[str]:
        """Marks ``image_newline`` as a fusion parameter for torchtune's ``get_fusion_params``."""
        return ["image_newline"]

    def param_groups(self) -> dict[str, list[str]]:
        """Parameter names by trainable group, plus ``unused`` (held for the checkpoint only) and
        ``adapter`` (LoRA/DoRA parameters found by torchtune's ``get_adapter_params``: always trained)."""
        fusion = set(get_fusion_params(self))
        adapters = set(get_adapter_params(self))
        unused = {f"encoder.{n}" for n in self.encoder.unused_params()}
        groups: dict[str, list[str]] = {"decoder": [], "encoder": [], "fusion": [], "unused": [], "adapter": []}
        for name, _ in self.named_parameters():
            if name in adapters:
                groups["adapter"].append(name)
            elif name in fusion:
                groups["fusion"].append(name)
            elif name in unused:
                groups["unused"].append(name)
            elif name.startswith("encoder."):
                groups["encoder"].append(name)
            else:
                groups["decoder"].append(name)
        return groups

    def set_trainable(self, *, decoder: bool, encoder: bool, fusion: bool) -> None:
        flags = {"decoder": decoder, "encoder": encoder, "fusion": fusion, "unused": False, "adapter": True}
        params = dict(self.named_parameters())
        for group, names in self.param_groups().items():
            for name in names:
                params[name].requires_grad_(flags[group])

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
    ) -> None:
        """KV caches on the decoder (the vision tower runs once, on the prompt), so torchtune's
        ``local_kv_cache`` and cached decoding work on the fused model as on ``EarlyFusionModel``."""
        self.decoder.setup_caches(
            batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len, decoder_max_seq_len=decoder_max_seq_len
        )

    def caches_are_setup(self) -> bool:
        return self.decoder.caches_are_setup()

    def caches_are_enabled(self) -> bool:
        return self.decoder.caches_are_enabled()

    def reset_caches(self) -> None:
        self.decoder.reset_caches()

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        """For ``CEWithChunkedOutputLoss``; call before the first forward (torchtune convention)."""
        self.decoder.set_num_output_chunks(num_output_chunks)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        image_grids: torch.Tensor | Sequence[Sequence[int]] | None = None,
        sampling_ratio: int | None = None,
        image_slots: torch.Tensor | None = None,
        inputs_checked: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Logits [B, S, vocab + fusion] (a list of chunks after ``set_num_output_chunks``).

        Args:
            tokens (torch.Tensor): [B, S] ids; each image fills its count of consecutive ``<image>`` ids.
            mask (torch.Tensor | None): [B, S, S] bool document mask for packed rows (True = may attend);
                with KV caches [B, S, cache length], the rows of a causal mask for the positions fed.
            input_pos (torch.Tensor | None): [B, S] position ids for packed rows (with caches: required).
            document_ids (torch.Tensor | None): [B, S] document index of each token of packed rows (what the
                collate ships instead of ``mask``); the block-causal mask is built from them on their device.
            pixel_values (torch.Tensor | None): [N_img, max_tiles, 3, T, T] normalised tiles in the model
                dtype, images in order over the batch (row-major: row, then position); tile 0 = base,
                then the grid row-major; tiles past 1 + rows·cols are padding and ignored.
            image_sizes (torch.Tensor | Sequence | None): [N_img, 2] original (height, width); Python lists (what
                the recipe passes) cost no host sync.
            image_grids (torch.Tensor | Sequence | None): [N_img, 2] (rows, cols) of the grid, base tile not
                counted; lists as ``image_sizes``.
            sampling_ratio (int | None): pooling ratio for every image of the batch.
            image_slots (torch.Tensor | None): ``image_positions`` of ``tokens``, computed on the host and copied
                with the batch (None: computed here, a host sync).
            inputs_checked (bool): the caller ran ``check_inputs`` on the host copy of the batch (the recipe
                does, before the copy to the device), so forward does no host-syncing check of its own.

        Raises:
            ValueError: when ``<image>`` tokens and image features disagree, naming the batch row.
        """
        if not inputs_checked:
            self.check_inputs(tokens, pixel_values, image_sizes, image_grids, sampling_ratio)
        embeds = self.tok_embeddings(tokens)
        if pixel_values is not None:
            if image_slots is None:
                image_slots = image_positions(tokens, self.image_token_id)
            features = self.image_features(pixel_values, image_sizes, image_grids, sampling_ratio)
            flat = embeds.reshape(-1, embeds.shape[-1]).index_put((image_slots,), features.to(embeds.dtype))
            embeds = flat.view_as(embeds)
        elif torch.is_grad_enabled():
            embeds = embeds + self._zero_vision_path().to(embeds.dtype)
        if document_ids is not None:
            if mask is not None:
                raise ValueError("pass either mask or document_ids, not both")
            mask = document_mask(document_ids, self.attention)
        return self.decoder(embeds, mask=mask, input_pos=input_pos)

    def _zero_vision_path(self) -> torch.Tensor:
        """0 × one element of every trainable parameter of the vision path (tower, connector, ``image_newline``),
        for a micro-batch without images: each then gets a zero gradient in its own dtype, as in a micro-batch
        with images. FSDP2 accumulates skipped reductions (``gradient_reduction: last_micro_batch``) in the
        reduce dtype; a parameter with no gradient in an earlier micro-batch would bring a compute-dtype one to
        the reduce-scatter beside the accumulated ones, which FSDP refuses (mixed gradient dtypes)."""
        params = [self.image_newline, *self.connector.parameters(), *self.encoder.parameters()]
        terms = [p.flatten()[0] for p in params if p.requires_grad]
        if not terms:
            return self.image_newline.new_zeros(())
        return torch.stack([t.to(terms[0].dtype) for t in terms]).sum() * 0

    def check_inputs(
        self,
        tokens: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | Sequence[Sequence[int]] | None,
        image_grids: torch.Tensor | Sequence[Sequence[int]] | None,
        sampling_ratio: int | None,
    ) -> None:
        """``<image>`` slots against the images, before any compute; errors name the batch row. Reads token
        values on the host, so the recipe runs it on the CPU batch, not on the device copy (a sync per call)."""
        is_image = tokens == self.image_token_id
        if pixel_values is None:
            rows = is_image.any(dim=1).nonzero().flatten().tolist()
            if rows:
                raise ValueError(f"batch row(s) {rows} hold <image> tokens but the batch has no pixel_values")
            return
        if image_sizes is None or image_grids is None or sampling_ratio is None:
            raise ValueError("pixel_values needs image_sizes, image_grids and sampling_ratio")
        n_img, max_tiles = pixel_values.shape[:2]
        sizes, grids = _as_pairs(image_sizes), _as_pairs(image_grids)
        if len(sizes) != n_img or len(grids) != n_img:
            raise ValueError(f"{n_img} images in pixel_values, {len(sizes)} image_sizes, {len(grids)} image_grids")
        for i, (r, c) in enumerate(grids):
            if 1 + r * c > max_tiles:
                raise ValueError(f"image {i}: grid {grids[i]} needs {1 + r * c} tiles, pixel_values holds {max_tiles}")
        side = pooled_side(self.tile_size, self.patch_size, sampling_ratio)
        check_image_slots(is_image, image_feature_counts(sizes, grids, side))

    def image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | Sequence[Sequence[int]],
        image_grids: torch.Tensor | Sequence[Sequence[int]],
        sampling_ratio: int,
    ) -> torch.Tensor:
        """Packed features of every image (``image_sizes``/``image_grids`` as lists: no device sync)."""
        sizes, grids = _as_pairs(image_sizes), _as_pairs(image_grids)
        tiles_per_image = [1 + r * c for r, c in grids]
        tiles = torch.cat([pixel_values[i, :n] for i, n in enumerate(tiles_per_image)])
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            vision = self.encoder(tiles)
        pooled = self.connector(vision, sampling_ratio)
        return pack_image_features(pooled.split(tiles_per_image), sizes, grids, self.image_newline)


def check_image_slots(is_image: torch.Tensor, counts: list[int]) -> None:
    """Images fill the batch rows in order; each row's ``<image>`` tokens must be whole images,
    and each image's tokens must be consecutive. Errors name the batch row (the sample)."""
    per_row = is_image.sum(dim=1).tolist()
    first = 0
    for row, n in enumerate(per_row):
        taken, last = 0, first
        while taken < n and last < len(counts):
            taken += counts[last]
            last += 1
        if taken != n:
            images = f"images {first}..{last - 1} need {counts[first:last]} features" if last > first else "none left"
            raise ValueError(f"batch row {row}: {n} <image> tokens do not match whole images ({images})")
        first = last
    if first != len(counts):
        raise ValueError(
            f"images {first}..{len(counts) - 1} have no <image> tokens: the batch holds {sum(per_row)}, "
            f"the images need {sum(counts)}"
        )
    if not counts:
        return
    pos = is_image.nonzero()
    lengths = torch.tensor(counts, device=pos.device)
    ends = lengths.cumsum(0) - 1
    starts, stops = pos[ends - lengths + 1].tolist(), pos[ends].tolist()
    for i, ((row, a), (_, b), n) in enumerate(zip(starts, stops, counts, strict=True)):
        if b - a != n - 1:
            raise ValueError(
                f"batch row {row}: image {i} needs {n} consecutive <image> tokens, "
                f"found them spread over {b - a + 1} positions"
            )
