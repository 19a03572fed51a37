"""How single gloo collectives spread on a shared CPU: quantiles of many repeats per size.

The profiler keeps the median of single ops (profiler.comm); this shows why it needs many
repeats below 16 MiB: on 2 shared cores the times are bimodal, a fast mode and a slow one of
a few ms when a rank waits for a core, and the median of few repeats can land in either.

    .venv/bin/python benchmarks/comm_modes.py [--nproc 2] [--collective all_gather]
                                              [--sizes 262144,393216,...] [--repeats 200]

Prints, per size: quantiles (min, 10, 25, 50, 75, 90%, max) of the slowest rank's time per
repeat in ms, the share of repeats slower than twice the 10% quantile, and the mean.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autoplan.launch import free_port
from autoplan.profiler.comm import _Group, _make_op

QUANTILES = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.nproc)
    group = _Group(tuple(range(args.nproc)), "intra")
    pg = dist.group.WORLD
    for nbytes in args.sizes:
        op, size = _make_op(args.collective, nbytes, group, pg, torch.device("cpu"))
        for _ in range(3):
            op()
        times_s = []
        for _ in range(args.repeats):
            dist.barrier()
            start_s = time.perf_counter()
            op()
            times_s.append(time.perf_counter() - start_s)
        slowest = torch.tensor(times_s, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # an op ends when every rank is done
        if rank == 0:
            ms = np.sort(slowest.numpy()) * 1e3
            slow = (ms > 2 * np.quantile(ms, 0.1)).mean()
            print(f"{args.collective} {size:>10} B  "
                  + " ".join(f"{q:6.2f}" for q in np.quantile(ms, QUANTILES))
                  + f"  slow {slow:4.0%}  mean {ms.mean():.2f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--collective", default="all_gather")
    parser.add_argument("--sizes", default="262144,393216,524288,786432,1048576,1572864",
                        type=lambda text: [int(v) for v in text.split(",")])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(f"{args.nproc} ranks, {os.cpu_count()} cores, {args.repeats} repeats; ms at "
          f"quantiles {', '.join(f'{q:.0%}' for q in QUANTILES)}", flush=True)
    mp.spawn(_worker, args=(args, free_port()), nprocs=args.nproc)


if __name__ == "__main__":
    main()
