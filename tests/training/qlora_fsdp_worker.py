"""torchrun worker of test_qlora: a QLoRA DocEV (NF4 base) sharded as the recipe shards it
(``parallelize_model`` → ``apply_fsdp``, filled by ``load_model_state`` with ``PeftRun.load_model``) on gloo.

Before training, the sharded model's logits are compared with an unsharded QLoRA model holding the same base
state (fresh adapters: ``lora_b`` = 0, so the adapters add nothing and the logits are the base's); then three
AdamW steps. Prints one JSON line per rank: the logits' largest difference, the losses, the local type of an
NF4 weight and whether any tower parameter was sharded."""

import json
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from docev.models.docev import docev_from_arch, tiny
from docev.training.parallelize import load_model_state, parallelize_model
from docev.training.peft import PeftRun

# width 256: every NF4 weight holds >= 2 scaler blocks, so FSDP2 can shard its quantisation factors over 2 ranks
ARCH = replace(tiny(), dim=256, kv_heads=4, mlp=512)
LORA = {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True, "quantize_base": True}
FP32 = torch.float32

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
reference = docev_from_arch(ARCH, decoder_trainable=False, lora=LORA)  # unsharded; NF4 from its own init
state = {k: v.get_original_weight() if hasattr(v, "get_original_weight") else v
         for k, v in reference.state_dict().items() if "lora_" not in k}  # fmt: skip  # the "base checkpoint"
with torch.device("meta"):
    model = docev_from_arch(ARCH, decoder_trainable=False, lora=LORA)
parallelize_model(model, compute_dtype=FP32, master_dtype=FP32)
load_model_state(model, state, torch.device("cpu"), FP32, fill=PeftRun.load_model)
tokens = torch.randint(0, ARCH.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
with torch.no_grad():
    logits_diff = (model(tokens) - reference(tokens)).abs().max().item()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
losses = []
for _ in range(3):
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
local = type(model.decoder.layers[0].attn.q_proj.weight._local_tensor).__name__
tower_sharded = any(isinstance(p, DTensor) for p in model.encoder.parameters())
print(json.dumps({"rank": rank, "logits_diff": logits_diff, "losses": losses, "local": local,
                  "tower_sharded": tower_sharded}))  # fmt: skip
dist.destroy_process_group()
