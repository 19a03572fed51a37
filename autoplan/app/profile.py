"""`autoplan profile`: model spec -> LayerGraph -> Profile (measured or analytic) -> files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autoplan.cluster import Cluster, parse_cluster_spec
from autoplan.cost_model import PRICED_COLLECTIVES
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.launch import split_counted, under_torchrun
from autoplan.models import DTYPES, build_model, parse_model_spec
from autoplan.profile import Profile, check_collectives
from autoplan.profiler import MeasureSettings
from autoplan.tracing import layer_graph_of_built

__all__ = ["DEFAULT_COMM_SIZES", "ProfileOptions", "Progress", "counted", "measure_settings",
           "run_profile", "priced_comm_sizes"]

# Every power of 2 from 1 KiB (the profiler issue's range starts there) to 128 MiB: the
# piecewise fit (profiler.comm.fit_alpha_beta) needs 3 sizes per regime, and gloo's
# all_gather and reduce_scatter change regime at 32 MiB, so 32, 64 and 128 MiB are all
# measured (benchmarks/results/comm_fit_notes.md). A profile times the part of this range
# its model's messages need (priced_comm_sizes); --comm-sizes all of it.
DEFAULT_COMM_SIZES = tuple(2**k for k in range(10, 28))
_MIN_COMM_SIZES = 6
"""At least two regimes of three sizes each (profiler.comm._fit_series)."""


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
    comm_sizes: tuple[int, ...] | None = None
    """None: the sizes this model's plans are priced at (priced_comm_sizes)."""
    collectives: tuple[str, ...] = PRICED_COLLECTIVES
    """The collectives to time: by default those the cost model prices."""
    comm: bool = True
    in_situ: bool = False
    """Time layers in nproc local ranks at once, TP as DTensors (profiler/in_situ.py)."""
    data_parallel: bool = True
    """In situ: also time every layer under data parallelism on every layout, ZeRO stage and
    micro-batch (False: none; `autoplan validate` times the points its plans use later)."""

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
        if self.comm_sizes is not None and (not self.comm_sizes or min(self.comm_sizes) < 1):
            raise AutoplanError(f"--comm-sizes must list byte counts >= 1, got {self.comm_sizes}")
        if not self.collectives:
            raise AutoplanError("--collectives must name at least one collective")
        check_collectives(self.collectives)
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise AutoplanError(f"device '{self.device}' is not cpu or cuda[:N]")
        if self.in_situ and (self.device != "cpu" or self.nproc < 2 or self.mode != "measure"):
            raise AutoplanError("--in-situ times layers on the CPU in --nproc >= 2 local ranks "
                                "(measure mode)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise AutoplanError(f"device '{self.device}' asked for, but CUDA is not available")


Progress = Callable[[str, str, int | None, int | None], None]
"""(stage, text, done, planned): stage is "layers" (a time point or an in-situ sample done)
or "comm" (a collective over a group done); done and planned count that stage's work where
it is known ahead (collectives, in-situ samples; None for layers timed alone)."""


def counted(stage: str, on_step: Progress | None) -> Callable[[str], None] | None:
    """A line callback that passes `stage` and the line's count (launch.split_counted) on."""
    if on_step is None:
        return None
    return lambda line: on_step(stage, *split_counted(line))


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
    comm_step = counted("comm", on_step)
    repeats = max(3, options.repeats // 2)
    sizes = list(options.comm_sizes or priced_comm_sizes(graph, options.micro_batches,
                                                         options.tps, dtype.itemsize))
    if options.comm and under_torchrun():
        from autoplan.profiler import fit_alpha_beta, measure_in_world

        points = measure_in_world(sizes, options.collectives, repeats=repeats,
                                  on_progress=comm_step)
        comm = (points, fit_alpha_beta(points))
        if os.environ["RANK"] != "0":
            return None
    elif options.comm and options.nproc >= 2:
        from autoplan.profiler import fit_alpha_beta, measure_collectives

        points = measure_collectives(options.nproc, sizes, options.collectives,
                                     repeats=repeats, on_progress=comm_step)
        comm = (points, fit_alpha_beta(points))
    settings = measure_settings(options)
    layer_step = counted("layers", on_step)
    in_situ = None
    if options.in_situ:
        from autoplan.profiler import time_layers_in_situ

        in_situ = (time_layers_in_situ(options.model, options.dtype, settings, options.nproc,
                                       on_progress=layer_step,
                                       data_parallel=None if options.data_parallel else {}),
                   options.nproc)
    return measured_profile(built, graph, cluster, settings, comm, layer_step, in_situ)


def measure_settings(options: ProfileOptions) -> MeasureSettings:
    """What the layer timing of a measured profile takes from its options."""
    return MeasureSettings(options.micro_batches, options.tps, options.repeats, options.warmup,
                           options.device, DTYPES[options.dtype], options.threads)


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


def priced_comm_sizes(graph: LayerGraph, samples: tuple[int, ...], tps: tuple[int, ...],
                      elt_bytes: int) -> tuple[int, ...]:
    """The powers of 2 of DEFAULT_COMM_SIZES from the one at or below the smallest message the
    cost model prices for `graph` (cost_model.priced_message_bytes) to the one at or above
    the largest, so that no priced size lies outside the fitted range; widened upwards (then
    downwards) to _MIN_COMM_SIZES. The top of the default range costs most of a profile's
    time (an all-reduce of 128 MiB over 4 ranks takes about a second on gloo here) and a
    small model never sends it."""
    from autoplan.cost_model import priced_message_bytes

    priced = priced_message_bytes(graph, samples, tps, elt_bytes) or [DEFAULT_COMM_SIZES[0]]
    low = max((s for s in DEFAULT_COMM_SIZES if s <= priced[0]), default=DEFAULT_COMM_SIZES[0])
    high = min((s for s in DEFAULT_COMM_SIZES if s >= priced[-1]),
               default=DEFAULT_COMM_SIZES[-1])
    sizes = [s for s in DEFAULT_COMM_SIZES if low <= s <= high]
    for s in (*(x for x in DEFAULT_COMM_SIZES if x > high),
              *(x for x in reversed(DEFAULT_COMM_SIZES) if x < low)):
        if len(sizes) >= _MIN_COMM_SIZES:
            break
        sizes.append(s)
    return tuple(sorted(sizes))
