"""torchtune decoder pieces changed for sharded, compiled training; the state-dict keys stay torchtune's.

**Output projection, one call for every loss chunk.** torchtune's ``TransformerDecoder.chunked_output`` calls
``output`` once per chunk. Sharded as its own FSDP unit, a module called eight times in forward runs its post-
backward (a reduce-scatter) and a re-gather per chunk: 8× the gradient traffic of the largest matrix (64064 ×
4096 at preview size). Here the decoder projects the whole sequence in one call and returns the chunks as views
of it, so FSDP gathers and reduces the projection once per micro-batch, whatever S is. Whatever ``output`` is
(``nn.Linear``, a LoRA/DoRA adapter) it is called the same way; the logits held are the same as torchtune's
(its chunks are all kept for the loss too). Being views, the chunks must not be modified in place (FSDP2 warns
that its pre-backward hook would be lost); the chunked loss only reads them.

**Fusion embedding without a host sync.** torchtune's ``FusionEmbedding`` splits the ids with
``masked_select``, whose output size depends on the data: on a GPU the host waits for the device on every
micro-batch (and a compiled graph breaks there). ``SyncFreeFusionEmbedding`` looks every id up in both
tables (clamped into range) and picks with ``torch.where``: same values and gradients, fixed shapes.
"""

from __future__ import annotations

import torch
from torchtune.modules import TransformerDecoder
from torchtune.modules.model_fusion import FusionEmbedding


class DocEVDecoder(TransformerDecoder):
    """``TransformerDecoder`` whose chunked output is one call of ``output`` (see the module docstring)."""

    def chunked_output(self, last_hidden_state: torch.Tensor) -> list[torch.Tensor]:
        return list(self.output(last_hidden_state).chunk(self.num_output_chunks, dim=1))


class SyncFreeFusionEmbedding(FusionEmbedding):
    """``FusionEmbedding`` (base rows + trainable fusion rows) with shapes that do not depend on the ids."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        vocab = self.embedding.num_embeddings
        base = self.embedding(input.clamp(max=vocab - 1))
        fusion = self.fusion_embedding((input - vocab).clamp(min=0))
        return torch.where((input < vocab).unsqueeze(-1), base, fusion)
