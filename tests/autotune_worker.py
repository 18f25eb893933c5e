"""Run under torchrun by tests/test_kernels_autotune.py: rank 0's kernel decisions reach rank 1.

torchrun --standalone --nproc_per_node=2 tests/autotune_worker.py OUT_DIR

Each rank has its own cache folder and a timer that ranks the same two real candidates the
opposite way round, so without the broadcast the ranks would decide differently.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

KEY = "worker.matmul|64x64"


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    os.environ["LONGTAIL_CACHE_DIR"] = os.path.join(out_dir, f"rank{rank}")
    from longtail.core.distributed import shutdown_distributed
    from longtail.models import autotune

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    faster = "kernel" if rank == 0 else "pytorch"
    calls: list[str] = []

    def timer(name, fn):
        fn()
        calls.append(name)
        return 1.0 if name == faster else 2.0

    candidates = {"kernel": lambda: torch.mm(a, b), "pytorch": lambda: a @ b}
    own = autotune.choose(KEY, candidates, timer)
    table = autotune.broadcast(autotune.decisions() if rank == 0 else {})
    after = autotune.lookup(KEY)
    rows: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, {"own": own, "after": after, "calls": calls, "keys": list(table)})
    if rank == 0:
        with open(os.path.join(out_dir, "out.json"), "w") as f:
            json.dump(rows, f)
    shutdown_distributed()  # plain destroy_process_group aborts ~1 exit in 4 (DISTRIBUTED.md)


if __name__ == "__main__":
    main(sys.argv[1])
