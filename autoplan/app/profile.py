"""`autoplan profile`: model spec -> LayerGraph -> Profile (measured or analytic) -> files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autoplan.cluster import Cluster, parse_cluster_spec
from autoplan.errors import AutoplanError
from autoplan.launch import under_torchrun
from autoplan.models import DTYPES, build_model, parse_model_spec
from autoplan.profile import Profile
from autoplan.profiler import MeasureSettings
from autoplan.tracing import layer_graph_of_built

__all__ = ["DEFAULT_COMM_SIZES", "ProfileOptions", "run_profile"]

# Every power of 2 from 1 KiB (the profiler issue's range starts there) to 128 MiB: the
# piecewise fit (profiler.comm.fit_alpha_beta) needs 3 sizes per regime, and gloo's
# all_gather and reduce_scatter change regime at 32 MiB, so 32, 64 and 128 MiB are all
# measured (benchmarks/results/comm_fit_notes.md).
DEFAULT_COMM_SIZES = tuple(2**k for k in range(10, 28))


@dataclass(frozen=True)
class ProfileOptions:
    model: str
    mode: str = "measure"
    cluster: str | None = None
    nproc: int = 2
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    tps: tuple[int, ...] = (1, 2, 4, 8)
    repeats: int = 10
    warmup: int = 3
    threads: int | None = None
    dtype: str | None = None
    """None: bf16 for GPUs (analytic, or --device cuda), fp32 on a CPU."""
    device: str = "cpu"
    comm_sizes: tuple[int, ...] = DEFAULT_COMM_SIZES
    comm: bool = True
    in_situ: bool = False
    """Time layers in nproc local ranks at once, TP as DTensors (profiler/in_situ.py)."""

    def __post_init__(self) -> None:
        if self.mode not in ("measure", "analytic"):
            raise AutoplanError(f"mode '{self.mode}' is not one of measure, analytic")
        if self.dtype is None:
            gpu = self.mode == "analytic" or self.device.startswith("cuda")
            object.__setattr__(self, "dtype", "bf16" if gpu else "fp32")
        if self.dtype not in DTYPES:
            raise AutoplanError(f"dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.mode == "analytic" and not self.cluster:
            raise AutoplanError("--mode analytic needs --cluster, e.g. h100-sxm:nodes=16")
        for what, values in (("micro-batches", self.micro_batches), ("tp", self.tps)):
            if not values or min(values) < 1:
                raise AutoplanError(f"--{what} must list integers >= 1, got {values}")
        if self.nproc < 1 or self.repeats < 1 or self.warmup < 0:
            raise AutoplanError("--nproc and --repeats must be >= 1 and --warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise AutoplanError(f"--threads must be >= 1, got {self.threads}")
        if not self.comm_sizes or min(self.comm_sizes) < 1:
            raise AutoplanError(f"--comm-sizes must list byte counts >= 1, got {self.comm_sizes}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise AutoplanError(f"device '{self.device}' is not cpu or cuda[:N]")
        if self.in_situ and (self.device != "cpu" or self.nproc < 2 or self.mode != "measure"):
            raise AutoplanError("--in-situ times layers on the CPU in --nproc >= 2 local ranks "
                                "(measure mode)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise AutoplanError(f"device '{self.device}' asked for, but CUDA is not available")


Progress = Callable[[str, str], None]
"""(stage, text): stage is "layers" (one time point done) or "comm" (one collective)."""


def run_profile(options: ProfileOptions, on_step: Progress | None = None) -> Profile | None:
    """Build the model on meta, then profile it as `options.mode` says.

    Under torchrun every rank times the collectives of the launched world (intra- and
    inter-node groups); rank 0 alone times the layers and returns the Profile, the other
    ranks return None.
    """
    spec = parse_model_spec(options.model)
    dtype = DTYPES[options.dtype]
    built = build_model(spec, dtype=dtype)
    graph = layer_graph_of_built(built, dtype)
    if options.mode == "analytic":
        from autoplan.cost_model import analytic_profile

        return analytic_profile(graph, parse_cluster_spec(options.cluster),
                                micro_batches=options.micro_batches, tps=options.tps)
    return _measure(options, built, graph, dtype, on_step)


def _measure(options: ProfileOptions, built, graph, dtype: torch.dtype,  # noqa: ANN001
             on_step: Progress | None) -> Profile:
    from autoplan.profiler import measured_profile

    cluster = _local_cluster(options)
    comm: tuple[list, list] = ([], [])
    comm_step = (lambda text: on_step("comm", text)) if on_step else None
    repeats = max(3, options.repeats // 2)
    if options.comm and under_torchrun():
        from autoplan.profiler import fit_alpha_beta, measure_in_world

        points = measure_in_world(list(options.comm_sizes), repeats=repeats,
                                  on_progress=comm_step)
        comm = (points, fit_alpha_beta(points))
        if os.environ["RANK"] != "0":
            return None
    elif options.comm and options.nproc >= 2:
        from autoplan.profiler import fit_alpha_beta, measure_collectives

        points = measure_collectives(options.nproc, list(options.comm_sizes), repeats=repeats,
                                     on_progress=comm_step)
        comm = (points, fit_alpha_beta(points))
    settings = MeasureSettings(options.micro_batches, options.tps, options.repeats,
                               options.warmup, options.device, dtype, options.threads)
    layer_step = (lambda text: on_step("layers", text)) if on_step else None
    in_situ = None
    if options.in_situ:
        from autoplan.profiler import time_layers_in_situ

        in_situ = (time_layers_in_situ(options.model, options.dtype, settings, options.nproc,
                                       on_progress=layer_step), options.nproc)
    return measured_profile(built, graph, cluster, settings, comm, layer_step, in_situ)


def _local_cluster(options: ProfileOptions) -> Cluster:
    """The cluster a measured profile describes: --cluster, else this machine's processes
    (under torchrun: the launched world, nodes x local ranks)."""
    if options.cluster:
        return parse_cluster_spec(options.cluster)
    if under_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        world = int(os.environ["WORLD_SIZE"])
        return parse_cluster_spec(f"local-cpu:procs={world},gpus_per_node={local}")
    return parse_cluster_spec(f"local-cpu:procs={options.nproc}")

