"""The export step: checkpoint → verified, checksummed Hugging Face folder with a model card
(``docev export``); generation from such a folder lives in :mod:`docev.inference`."""

from docev.export.checksums import SUMS, ChecksumError, verify_checksums, write_checksums
from docev.export.export import ExportResult, export_checkpoint, pick_smoke_sample
from docev.export.weights import ExportError, export_tensors, frozen_state_keys

__all__ = [
    "SUMS",
    "ChecksumError",
    "ExportError",
    "ExportResult",
    "export_checkpoint",
    "export_tensors",
    "frozen_state_keys",
    "pick_smoke_sample",
    "verify_checksums",
    "write_checksums",
]
