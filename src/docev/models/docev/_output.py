"""The decoder's output projection applied to every loss chunk in one module call.

torchtune's ``TransformerDecoder.chunked_output`` calls ``output`` once per chunk. Sharded as its own FSDP
unit, a module called eight times in forward runs its post-backward (a reduce-scatter) and a re-gather per
chunk: 8× the gradient traffic of the largest matrix (64064 × 4096 at preview size). Here the decoder calls
the projection once with the chunk count, so FSDP gathers and reduces it once per micro-batch, whatever S is.
The state-dict key stays ``decoder.output.weight``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchtune.modules import TransformerDecoder


class ChunkedOutputProjection(nn.Linear):
    """``nn.Linear`` that can return its output as ``num_chunks`` chunks along the sequence (dim 1)."""

    def forward(self, x: torch.Tensor, num_chunks: int = 0) -> torch.Tensor | list[torch.Tensor]:
        if not num_chunks:
            return super().forward(x)
        return [nn.functional.linear(c, self.weight, self.bias) for c in x.chunk(num_chunks, dim=1)]


class DocEVDecoder(TransformerDecoder):
    """``TransformerDecoder`` whose chunked output is one call of a ``ChunkedOutputProjection``."""

    def chunked_output(self, last_hidden_state: torch.Tensor) -> list[torch.Tensor]:
        return self.output(last_hidden_state, num_chunks=self.num_output_chunks)
