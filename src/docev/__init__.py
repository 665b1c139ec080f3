"""DocEV fine-tuning pipelines: the config, the data steps, training, evaluation and export."""

import logging


class _CppExtensionsSkipped(logging.Filter):
    """torchao logs "Skipping import of cpp extensions due to incompatible torch version" on every import (every
    command, task and rank that imports torchtune) when its compiled kernels were built for another torch than the
    pinned one (requirements.lock). Those kernels are the low-bit GEMMs (int4/fp8, marlin); DocEV uses torchao only
    for NF4 (QLoRA), which is plain torch code, so the message is noise. Every other torchao message still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Skipping import of cpp extensions due to incompatible torch")


logging.getLogger("torchao").addFilter(_CppExtensionsSkipped())
