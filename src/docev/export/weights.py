"""The tensors of an export: a checkpoint's weights in the released HF key layout, in the asked dtype.

Frozen groups (by the config's ``model`` trainable flags, plus the parameters the model never runs
and the SigLIP ``head.*`` it has no parameter for) are taken from the base checkpoint rather than
from the training checkpoint. Training may have held them in a lower precision (an fp32 base
trained in bf16), and an export in the base dtype must give the base's bits back. The
checkpoint's copy is checked against the base first: a frozen tensor that changed means the
checkpoint was not trained from this base with these flags, and the export stops.
"""

from __future__ import annotations

from pathlib import Path

import torch

from docev.config import ModelSection
from docev.models.arch import hf_param_shapes
from docev.models.docev import DocEVArch, DocEVCheckpointer, docev, docev_hf_to_tune, docev_tune_to_hf


class ExportError(RuntimeError):
    """An export that cannot be made or failed its checks; nothing was published."""


def frozen_state_keys(arch: DocEVArch, model: ModelSection) -> list[str]:
    """State-dict keys of the parameters the config trains with ``requires_grad=False``.

    The model is built on the meta device and parameters are matched to state-dict entries by
    identity, so renames done by state-dict hooks (``FusionEmbedding``) are followed."""
    with torch.device("meta"):
        built = docev(
            arch,
            decoder_trainable=model.decoder_trainable,
            encoder_trainable=model.encoder_trainable,
            fusion_trainable=model.fusion_trainable,
        )
    frozen = {id(p) for p in built.parameters() if not p.requires_grad}
    return [k for k, v in built.state_dict(keep_vars=True).items() if id(v) in frozen]


def export_tensors(
    checkpoint_dir: Path, base_dir: Path, model: ModelSection, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], DocEVArch]:
    """HF-layout tensors in ``dtype``, ordered as the released checkpoint, and the architecture.

    Raises:
        ExportError: the checkpoint and the base differ in architecture, or a frozen tensor changed.
    """
    ckpt = DocEVCheckpointer(checkpoint_dir)
    arch = ckpt.arch
    state, unused = docev_hf_to_tune(ckpt.load_hf_state_dict(), arch)
    if checkpoint_dir.resolve() != base_dir.resolve():
        base = DocEVCheckpointer(base_dir)
        if base.arch != arch:
            raise ExportError(f"{checkpoint_dir} and the base checkpoint {base_dir} have different architectures")
        keys = frozen_state_keys(arch, model)
        base_state, base_unused = docev_hf_to_tune(base.load_hf_state_dict(), arch)
        base_state = {k: base_state[k] for k in keys}  # free the rest of the base early
        if set(base_unused) != set(unused):
            raise ExportError(f"{checkpoint_dir}: unused tensors {sorted(set(base_unused) ^ set(unused))[:5]} "
                              f"differ from the base {base_dir}")  # fmt: skip
        for key, want in [*base_state.items(), *base_unused.items()]:
            have = state[key] if key in state else unused[key]
            if not torch.equal(have, want.to(have.dtype)):
                raise ExportError(
                    f"{checkpoint_dir}: frozen tensor {key} differs from the base checkpoint {base_dir}; "
                    "the checkpoint was not trained from this base with these model.*_trainable flags"
                )
        state.update(base_state)
        unused = base_unused
    return ordered_hf(docev_tune_to_hf(state, arch), unused, arch, dtype), arch


def ordered_hf(
    hf: dict[str, torch.Tensor], unused: dict[str, torch.Tensor], arch: DocEVArch, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model's HF tensors plus the unused ones, in ``dtype``, in the released checkpoint's order."""
    hf = {**hf, **unused}
    layout = hf_param_shapes(arch)
    order = [k for k in layout if k in hf] + sorted(k for k in hf if k not in layout)
    return {k: hf[k].to(dtype).contiguous() for k in order}
