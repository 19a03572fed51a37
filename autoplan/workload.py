"""The one front door: a model's layer graph, the cluster, a profile checked against the
graph, and the memory limit in bytes, made once from what the user typed.

Every command (estimate, search, plot, run, validate) and `autoplan.auto` start from a
Workload, so that spec parsing, tracing, the profile-vs-graph hash check and the GiB-to-bytes
conversion each exist once, here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from autoplan.cluster import Cluster, parse_cluster_spec
from autoplan.errors import AutoplanError
from autoplan.graph import LayerGraph
from autoplan.graph_cache import cached_graph
from autoplan.hardware import GiB
from autoplan.profile import Profile, load_profile

__all__ = ["Workload", "WorkloadOptions", "load_workload", "load_graph", "check_profile",
           "memory_limit_bytes", "is_saved_graph", "CLI_DTYPES"]

CLI_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
"""Trace dtype (LayerGraph.dtype, Profile.dtype) -> the name --dtype takes."""


@dataclass(frozen=True)
class Workload:
    """What a plan is made for: the model's graph on a cluster, priced by a profile (or the
    cluster's datasheet when None), under a memory limit (None: the device's memory)."""

    graph: LayerGraph
    cluster: Cluster
    profile: Profile | None = None
    memory_limit_bytes: int | None = None
    model: str = ""
    """The model as the user named it: a spec, a graph.json path, or the graph's name."""


@dataclass(frozen=True, kw_only=True)
class WorkloadOptions:
    """A Workload as a command is told it (load_workload's arguments, as typed): the base of
    the estimate, search and plot options, checked when made so that bad input fails before
    any tracing."""

    model: str
    """A model spec, or a graph.json written by `autoplan inspect -o` (no tracing)."""
    cluster: str
    profile: str | None = None
    dtype: str = "bf16"
    attention: str = "flash"
    seq: int | None = None
    memory_limit_gib: float | None = None
    cache: bool = True
    """Whether a spec's graph may come from, and go to, the graph cache (--no-cache: no)."""

    def __post_init__(self) -> None:
        if self.seq is not None and self.seq < 1:
            raise AutoplanError(f"--seq must be at least 1, got {self.seq}")
        memory_limit_bytes(self.memory_limit_gib)

    def load(self) -> Workload:
        """The Workload these options name (see load_workload)."""
        return load_workload(self.model, self.cluster, self.profile, self.dtype,
                             self.attention, self.seq, self.memory_limit_gib,
                             cache=self.cache)


def memory_limit_bytes(gib: float | None) -> int | None:
    """`--memory-limit` in bytes; None leaves the device's own memory.

    Raises:
        AutoplanError: unless it is a positive, finite number of GiB.
    """
    if gib is None:
        return None
    if not 0 < gib < math.inf:
        raise AutoplanError(f"--memory-limit must be positive finite GiB, got {gib}")
    return int(gib * GiB)


def is_saved_graph(model: str) -> bool:
    """True when `model` names a graph.json written by `autoplan inspect -o`, not a spec
    (an hf: spec names a config.json)."""
    return model.endswith(".json") and not model.startswith("hf:")


def load_graph(model: str, dtype: str = "bf16", attention: str = "flash",
               seq: int | None = None, cache: bool = True) -> LayerGraph:
    """The layer graph of a spec (traced, or read from the graph cache when `cache`: see
    autoplan/graph_cache.py) or of a saved graph.json (read, no tracing).

    Raises:
        AutoplanError: on a bad spec or file, or --seq given with a saved graph.
    """
    if is_saved_graph(model):
        if seq is not None:
            raise AutoplanError("--seq applies to a model spec, not to a saved graph.json")
        return LayerGraph.load(model)

    def trace() -> LayerGraph:
        from autoplan.models.spec import spec_with_seq
        from autoplan.tracing import trace_spec  # torch: only when a model is traced

        return trace_spec(model if seq is None else spec_with_seq(model, seq), dtype, attention)

    return cached_graph(model, dtype, attention, seq, trace) if cache else trace()


def check_profile(profile: Profile, graph: LayerGraph, name: str = "the profile",
                  saved_graph: bool = False, takes_dtype: bool = True) -> None:
    """Refuse a profile made for another model or dtype than `graph`, saying which and how
    to get a matching one (profiles are keyed by the graph's structural hash); a command
    without --dtype (run, which trains in fp32) is told only how to profile again.

    Raises:
        AutoplanError: naming both models, or both dtypes and the --dtype that matches.
    """
    if profile.model_hash == graph.structural_hash:
        return
    made = CLI_DTYPES.get(profile.dtype, profile.dtype)
    traced = CLI_DTYPES.get(graph.dtype, graph.dtype)
    if made != traced and profile.model == graph.model:  # the same model in another dtype
        if saved_graph:  # a saved graph keeps the dtype it was traced in
            raise AutoplanError(f"{name} was made in {made}, and the graph was traced in "
                                f"{traced}: inspect the model again with --dtype {made} -o "
                                f"DIR (or profile with --dtype {traced})")
        other = f"give --dtype {made} (or profile with --dtype {traced})" if takes_dtype \
            else f"profile with --dtype {traced}"
        raise AutoplanError(f"{name} was made in {made}, and this command traces the model "
                            f"in {traced}: {other}")
    raise AutoplanError(f"{name} is of model {profile.model} (hash {profile.model_hash}), not "
                        f"{graph.model} ({graph.structural_hash}); profile this model")


def load_workload(model: str | LayerGraph, cluster: str | Cluster,
                  profile: str | Path | Profile | None = None, dtype: str = "bf16",
                  attention: str = "flash", seq: int | None = None,
                  memory_limit_gib: float | None = None, takes_dtype: bool = True,
                  cache: bool = True) -> Workload:
    """A Workload from what the user gave: specs and paths, or objects already made
    (`takes_dtype`: whether the command has --dtype, for the profile check's advice;
    `cache`: whether a spec's graph may come from, and go to, the graph cache).

    Raises:
        AutoplanError: on any bad input, naming it (one line).
    """
    limit = memory_limit_bytes(memory_limit_gib)
    if isinstance(cluster, str):
        cluster = parse_cluster_spec(cluster)
    if isinstance(model, LayerGraph):
        graph, name = model, model.model
    else:
        graph, name = load_graph(model, dtype, attention, seq, cache), model
    if profile is not None and not isinstance(profile, Profile):
        label = f"profile '{Path(profile)}'"
        profile = load_profile(profile)
        check_profile(profile, graph, label, isinstance(model, str) and is_saved_graph(model),
                      takes_dtype)
    elif profile is not None:
        check_profile(profile, graph, takes_dtype=takes_dtype)
    return Workload(graph, cluster, profile, limit, name)
