"""Inference below both the export (its smoke generation) and evaluation: greedy decoding from a DocEV
model folder, one prompt or a padded batch."""

from docev.inference.adapter import apply_adapter
from docev.inference.generate import DocEVGenerator, Generation, greedy_generate, greedy_generate_batch

__all__ = ["DocEVGenerator", "Generation", "apply_adapter", "greedy_generate", "greedy_generate_batch"]
