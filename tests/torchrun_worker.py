"""A rank program as users write them, launched by `torchrun` in tests/test_multiprocess.py:
env:// rendezvous, the default Buffer arguments, one dispatch and combine checked against
the plain-PyTorch reference."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import reference as ref  # noqa: E402
from dualcomm import Buffer  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
buf = Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20, explicitly_destroy=True)
inputs = ref.random_inputs(world, [21] * world, 16, 2, 2 * world, torch.float32, seed=3)
inp = inputs[rank]
_, _, pe, itr, _ = buf.get_dispatch_layout(inp.topk_idx, 2 * world)
recv_x, _, _, _, handle, _ = buf.dispatch(inp.x, is_token_in_rank=itr)
combined, _, _ = buf.combine(recv_x, handle)
assert torch.equal(recv_x, ref.dispatch(inputs, 2 * world, world, rank)[0])
assert torch.equal(combined, inp.x * itr.sum(1, keepdim=True))
print(f"rank {rank}/{world} ok over {buf.transport} ({buf.num_nodes}x{buf.ranks_per_node})", flush=True)
buf.destroy()
dist.destroy_process_group()
