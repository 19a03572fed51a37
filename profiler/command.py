"""`autoplan profile`: model spec -> LayerGraph -> Profile (measured or analytic) -> files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autoplan.cluster import Cluster, parse_cluster_spec
from autoplan.errors import AutoplanError
from autoplan.models import DTYPES, build_model, parse_model_spec
from autoplan.profiler.compute import MeasureSettings
from autoplan.profiler.profile import Profile
from autoplan.tracing import layer_graph_of_built

__all__ = ["DEFAULT_COMM_SIZES", "ProfileOptions", "run_profile", "under_torchrun"]

# 1 KiB to 64 MiB in steps of 4x: the range the profiler issue asks for.
DEFAULT_COMM_SIZES = tuple(2**k for k in range(10, 27, 2))


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
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise AutoplanError(f"device '{self.device}' asked for, but CUDA is not available")


Progress = Callable[[str, str], None]
"""(stage, text): stage is "layers" (one time point done) or "comm" (one collective)."""


def under_torchrun() -> bool:
    """True in a rank that torchrun started (it sets RANK, WORLD_SIZE and LOCAL_WORLD_SIZE)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"))


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
        from autoplan.profiler.analytic import analytic_profile

        return analytic_profile(graph, parse_cluster_spec(options.cluster),
                                micro_batches=options.micro_batches, tps=options.tps)
    return _measure(options, built, graph, dtype, on_step)


def _measure(options: ProfileOptions, built, graph, dtype: torch.dtype,  # noqa: ANN001
             on_step: Progress | None) -> Profile:
    from autoplan.profiler.measure import measured_profile

    cluster = _local_cluster(options)
    comm: tuple[list, list] = ([], [])
    comm_step = (lambda text: on_step("comm", text)) if on_step else None
    repeats = max(3, options.repeats // 2)
    if options.comm and under_torchrun():
        from autoplan.profiler.comm import fit_alpha_beta, measure_in_world

        points = measure_in_world(list(options.comm_sizes), repeats=repeats,
                                  on_progress=comm_step)
        comm = (points, fit_alpha_beta(points))
        if os.environ["RANK"] != "0":
            return None
    elif options.comm and options.nproc >= 2:
        from autoplan.profiler.comm import fit_alpha_beta, measure_collectives

        points = measure_collectives(options.nproc, list(options.comm_sizes), repeats=repeats,
                                     on_progress=comm_step)
        comm = (points, fit_alpha_beta(points))
    settings = MeasureSettings(options.micro_batches, options.tps, options.repeats,
                               options.warmup, options.device, dtype, options.threads)
    layer_step = (lambda text: on_step("layers", text)) if on_step else None
    return measured_profile(built, graph, cluster, settings, comm, layer_step)


def _local_cluster(options: ProfileOptions) -> Cluster:
    """The cluster a measured profile describes: --cluster, else this machine's processes
    (under torchrun: the launched world, nodes x local ranks)."""
    if options.cluster:
        return parse_cluster_spec(options.cluster)
    if under_torchrun():
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        world = int(os.environ["WORLD_SIZE"])
        return parse_cluster_spec(f"local-cpu:procs={world},gpus_per_node={local}")
    return parse_cluster_spec(f"local-cpu:procs={options.nproc}")

