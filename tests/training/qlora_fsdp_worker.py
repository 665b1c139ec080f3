"""torchrun worker of test_qlora: a QLoRA DocEV (NF4 base) sharded with FSDP2 on gloo, three AdamW steps.
Prints one JSON line per rank: the losses and the local type of an NF4 weight."""

import json
from dataclasses import replace

import torch
import torch.distributed as dist
from torchtune import training

from docev.models.docev import docev_from_arch, tiny
from docev.training.parallelize import shard_condition
from docev.training.peft import PeftRun

# width 256: every NF4 weight holds >= 2 scaler blocks, so FSDP2 can shard its quantisation factors over 2 ranks
ARCH = replace(tiny(), dim=256, kv_heads=4, mlp=512)
LORA = {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True, "quantize_base": True}

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
reference = docev_from_arch(ARCH, decoder_trainable=False, lora=LORA)  # the "base checkpoint" (bf16 → NF4 on load)
state = {k: v.get_original_weight() if hasattr(v, "get_original_weight") else v
         for k, v in reference.state_dict().items() if "lora_" not in k}  # fmt: skip
with torch.device("meta"):
    model = docev_from_arch(ARCH, decoder_trainable=False, lora=LORA)
training.shard_model(model, [shard_condition], cpu_offload=False, reshard_after_forward=True)
PeftRun.load_model(model, state, torch.device("cpu"))  # the recipe's fill: base, then fresh adapters
for m in model.modules():
    if hasattr(m, "rope_init"):
        m.rope_init()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
tokens = torch.randint(0, ARCH.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
losses = []
for _ in range(3):
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
local = type(model.decoder.layers[0].attn.q_proj.weight._local_tensor).__name__
print(json.dumps({"rank": rank, "losses": losses, "local": local}))
dist.destroy_process_group()
