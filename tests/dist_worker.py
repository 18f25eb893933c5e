"""Run under torchrun by tests/test_distributed.py: sampler shards, SWAG state and the agreed
precision per rank.

torchrun --standalone --nproc_per_node=2 tests/dist_worker.py OUT.json SWAG.pt
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.distributed import shutdown_distributed
from longtail.core.io import atomic_torch_save, verified_load
from longtail.core.runtime import Runtime, agree_on_precision
from longtail.data.samplers import SAMPLERS, make_sampler
from longtail.train.swag import SWAG

LABELS = np.repeat(np.arange(6), [300, 120, 50, 20, 8, 3])


def main(out_json: str, swag_path: str) -> None:
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    # each rank timed precision=auto itself and the timings disagreed: rank 0's counts
    mine = Runtime(torch.device("cpu"), torch.bfloat16 if rank == 0 else None, True, rank, ws)
    precisions = [None] * ws
    dist.all_gather_object(precisions, (mine.precision, agree_on_precision(mine).precision))
    shards = {}
    for name in SAMPLERS:
        s = make_sampler(name, LABELS, seed=3, total_epochs=4, rank=rank, world_size=ws)
        mine = s.shard(epoch=1).tolist()
        every = [None] * ws
        dist.all_gather_object(every, mine)
        shards[name] = every

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    swag = SWAG(model, rank=4)
    g = torch.Generator().manual_seed(rank)
    for _ in range(8):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        swag.collect(model)
    if rank == 0:
        atomic_torch_save(swag.state_dict(), swag_path)
    dist.barrier()
    loaded = SWAG(model, rank=4)
    loaded.load_state_dict(verified_load(swag_path))
    mine_state = swag.state_dict()
    same = (
        all(
            torch.equal(mine_state[k], loaded.state_dict()[k])
            for k in ("mean", "sq_mean", "deviations")
        )
        and mine_state["n"] == loaded.n
    )
    flags = [None] * ws
    dist.all_gather_object(flags, bool(same))
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(
                {"world_size": ws, "shards": shards, "swag_equal": flags, "precision": precisions},
                f,
            )
    # DDP holds the process group: while `net` lives, destroy_process_group cannot free the
    # group, its gloo threads outlive main() and may release a finished all_gather's tensors
    # during interpreter shutdown, which aborts the process (see shutdown_distributed).
    del net
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
