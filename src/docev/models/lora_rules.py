"""Which LoRA settings cannot train: shared by the config check and the ``lora_*`` builders.

Kept apart from :mod:`docev.models.docev` (which imports torch and torchtune) so that ``docev config
validate`` and the data steps check a LoRA config without importing the training stack.
"""

from __future__ import annotations

from typing import Any


def lora_problems(
    *,
    decoder_trainable: bool,
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    quantize_base: bool,
    **_: Any,
) -> list[tuple[str, str]]:
    """Settings of a LoRA builder that cannot work, as (``model`` key, reason); the config check and the
    builders share it."""
    problems = []
    if decoder_trainable:
        why = (
            "quantize_base stores the decoder's frozen weights in NF4, which cannot be trained"
            if quantize_base
            else "the decoder carries the adapters, so it would be both fully trained and adapted"
        )
        problems.append(("decoder_trainable", f"true with LoRA on the decoder: {why}; set it to false"))
    unknown = sorted(set(lora_attn_modules) - {"q_proj", "k_proj", "v_proj", "output_proj"})
    if unknown:
        why = "not attention projections (q_proj, k_proj, v_proj, output_proj)"
        problems.append(("lora_attn_modules", f"{unknown}: {why}"))
    if not lora_attn_modules and not apply_lora_to_mlp and not apply_lora_to_output:
        why = "no adapter to train (docev_tiny/docev_preview fine-tune fully)"
        problems.append(("lora_attn_modules", f"empty, and apply_lora_to_mlp/apply_lora_to_output false: {why}"))
    if lora_rank < 1:
        problems.append(("lora_rank", f"{lora_rank}: must be at least 1"))
    if lora_alpha <= 0:
        problems.append(("lora_alpha", f"{lora_alpha}: must be positive"))
    if not 0.0 <= lora_dropout < 1.0:
        problems.append(("lora_dropout", f"{lora_dropout}: must be in [0, 1)"))
    return problems
