"""The data-parallel all-gather timed alone, every process arriving together (``train speed-ddp``'s "alone").

``torchrun --nproc-per-node N -m train.studies.all_gather FLOATS``: process 0 prints the median seconds as JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from train.distributed.gather import all_gather
from train.distributed.group import is_main, setup, world_size

__all__ = ["all_gather_seconds"]


def all_gather_seconds(floats: int, repeats: int = 30) -> float:
    """Median seconds of one ``all_gather`` of ``floats`` float32 per process, every process arriving together.

    A barrier precedes each timed call, so no process waits for a slower one: this is the collective's own
    cost (latency and transfer), the part of training's ``gather`` seconds that is not waiting.
    """
    message = torch.zeros(floats)
    all_gather(message)  # connections warm
    seconds = []
    for _ in range(repeats):
        if world_size() > 1:
            dist.barrier()
        started = time.perf_counter()
        all_gather(message)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    setup()
    size = int(argv[0])
    result = {"processes": world_size(), "floats": size, "seconds": all_gather_seconds(size)}
    if is_main():
        print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
