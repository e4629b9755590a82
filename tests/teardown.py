"""The abort at exit that real_dllm.stop() avoids, in a few lines of torch alone (not collected).

    for i in $(seq 20); do torchrun --standalone --nproc_per_node 2 tests/teardown.py keep; done
    for i in $(seq 20); do torchrun --standalone --nproc_per_node 2 tests/teardown.py free; done

"keep" leaves the group with the sharded model still alive, as bgpo.py did until its model was
collected first: FSDP2 keeps the process group (mesh_info.shard_process_group), so
destroy_process_group does not end gloo's worker threads, and a thread that frees a collective's
work while the interpreter shuts down aborts the process ("terminate called without an active
exception"): 3 of 20 runs with torch 2.13.0 on 2 CPU cores. "free" collects the model first:
0 of 20.
"""
import gc
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
for layer in model:
    fully_shard(layer)
fully_shard(model)
for _ in range(3):
    model(torch.randn(8, 64)).sum().backward()
with torch.no_grad():
    model(torch.randn(8, 64))
if sys.argv[1:] == ["free"]:
    del model
    gc.collect()
dist.barrier()
dist.destroy_process_group()
