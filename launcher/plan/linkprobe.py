"""Time collectives against message size over the processes of a launch (``accelerate launch`` starts it):
all-reduce, all-gather and reduce-scatter at each size (gloo builds its reduce-scatter from an all-reduce, so
its time is measured rather than taken from a ring's).

    accelerate launch --multi_gpu --num_processes 2 launcher/plan/linkprobe.py OUT.json [SIZE_BYTES ...]

Rank 0 writes OUT.json: the sizes, the median seconds of each collective, the world size and the backend.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

SIZES_BYTES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
WARMUP, REPEATS = 2, 7


def timed(fn) -> float:  # noqa: ANN001 - a collective on fixed tensors
    """Median seconds of ``fn`` after a warm-up, each call started together on every rank (a barrier)."""
    times = []
    for i in range(WARMUP + REPEATS):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    # Every rank's median can differ: the slowest rank's is what a collective costs the job.
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def main(out: str, sizes: list[int]) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # reduce_scatter_tensor's rename, not our concern
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    result = {"world_size": world, "backend": dist.get_backend(), "sizes_bytes": sizes}
    reduced, gathered, scattered = [], [], []
    for size in sizes:
        whole = torch.zeros(size // 4)
        reduced.append(timed(lambda x=whole: dist.all_reduce(x)))
        shard, full = torch.zeros(size // 4 // world), torch.zeros(size // 4 // world * world)
        gathered.append(timed(lambda s=shard, f=full: dist.all_gather_into_tensor(f, s)))
        scattered.append(timed(lambda s=shard, f=full: dist.reduce_scatter_tensor(s, f)))
    result.update(all_reduce_s=reduced, all_gather_s=gathered, reduce_scatter_s=scattered)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2:]] or SIZES_BYTES)
