"""The export step: checkpoint → verified, checksummed Hugging Face folder with a model card; and
greedy generation from such a folder (``docev export``, ``docev generate``)."""

from docev.export.checksums import SUMS, ChecksumError, verify_checksums, write_checksums
from docev.export.export import ExportResult, export_checkpoint, pick_smoke_sample, resolve_checkpoint
from docev.export.generate import DocEVGenerator, Generation, greedy_generate
from docev.export.weights import ExportError, export_tensors, frozen_state_keys

__all__ = [
    "SUMS",
    "ChecksumError",
    "DocEVGenerator",
    "ExportError",
    "ExportResult",
    "Generation",
    "export_checkpoint",
    "export_tensors",
    "frozen_state_keys",
    "greedy_generate",
    "pick_smoke_sample",
    "resolve_checkpoint",
    "verify_checksums",
    "write_checksums",
]
