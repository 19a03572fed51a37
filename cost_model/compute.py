"""Forward, backward and recompute time of one layer on one rank: from a measured profile's
linear fits, or from the graph and the cluster's datasheet figures (cost_model/analytic.py).

Both sources give time = a + b x samples per TP degree; the analytic one also knows what
sequence parallelism shards and what selective recomputation repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoplan.cluster import Cluster
from autoplan.cost_model.analytic import (
    TP_SHARDED_KINDS,
    layer_pass_work,
    pass_time_s,
    tp_shards,
)
from autoplan.errors import AutoplanError
from autoplan.graph import LayerNode
from autoplan.profile import LayerProfile, Profile

__all__ = ["LayerTimes", "ComputeModel", "core_share", "data_parallel_key"]


def data_parallel_key(node: LayerNode, samples: int, dp: int, tp: int,
                      zero: int) -> tuple[str, int, int, int, int] | None:
    """The in-situ point (signature, dp, tp, ZeRO stage, samples per rank) that prices `node`
    under data parallelism (ComputeModel.data_parallel_times), or None at dp < 2: a layer the
    TP plan leaves whole is timed at tp 1, ZeRO 1 as 2 (a step of one micro-batch runs the
    same under both: executor/data_parallel.py)."""
    if dp < 2:
        return None
    return (node.signature, dp, tp if node.kind in TP_SHARDED_KINDS else 1,
            2 if zero == 1 else zero, samples)


@dataclass(frozen=True)
class LayerTimes:
    """Seconds one rank spends on one layer for one micro-batch."""

    fwd_s: float
    bwd_s: float
    recompute_s: float
    """Extra forward work in backward: all of forward (full), the S x S part (selective)."""
    recompute_flops: float


class ComputeModel:
    """Layer times at (samples per rank, tp, sequence parallel, checkpointing)."""

    def __init__(self, cluster: Cluster, elt_bytes: int, profile: Profile | None = None) -> None:
        self.device = cluster.device
        self.elt_bytes = elt_bytes  # bytes of one element in the training dtype
        self.layers: dict[str, LayerProfile] = {}
        self.core_share = 1.0
        self.tp_comm_in_layers = False
        """True when measured tp > 1 times already hold the TP collectives (in situ)."""
        self.rank_threads: float | None = None
        """Threads per node over its cores when a measured CPU profile shows them (else None)."""
        if profile is not None:
            self.layers = {layer.signature: layer for layer in profile.layers}
            self.core_share = core_share(cluster, profile)
            cores = cluster.device.cores_per_node
            if cores and profile.machine is not None:
                self.rank_threads = cluster.gpus_per_node * profile.machine.threads / cores
            self.tp_comm_in_layers = profile.machine is not None and \
                profile.machine.ranks_timing > 1
        elif self.device.peak_flops is None or self.device.memory_bandwidth is None:
            raise AutoplanError(f"cluster '{cluster.spec}' has no datasheet figures: give "
                                "--profile DIR from `autoplan profile`")

    def times(self, node: LayerNode, samples: int, tp: int, sequence_parallel: bool,
              checkpoint: str) -> LayerTimes:
        if self.layers:
            return self._measured(node, samples, tp, checkpoint)
        return self._analytic(node, samples, tp, sequence_parallel, checkpoint)

    def _measured(self, node: LayerNode, samples: int, tp: int, checkpoint: str) -> LayerTimes:
        """From the profile's fit at `tp`. Sequence parallelism is not in a measured profile
        (layers are timed whole), so it changes nothing here; selective recomputation costs
        the forward's share of S x S FLOPs."""
        layer = self.layers.get(node.signature)
        if layer is None:
            raise AutoplanError(f"the profile has no layer like {node.name} (signature "
                                f"{node.signature}); profile this model again")
        if node.kind not in TP_SHARDED_KINDS:
            tp = 1  # replicated on every TP rank: its shape and time do not change with tp
        try:
            fit = layer.fit(tp)
        except KeyError:
            have = ", ".join(str(f.tp) for f in layer.fits)
            raise AutoplanError(f"layer {node.name}: tp {tp} not profiled (have {have}); "
                                f"profile with --tp including {tp}") from None
        fwd = fit.fwd_s(samples) * self.core_share
        bwd = fit.bwd_s(samples) * self.core_share
        share = node.attn_fwd_flops / node.fwd_flops if node.fwd_flops else 0.0
        recompute = {"none": 0.0, "selective": fwd * share, "full": fwd}[checkpoint]
        return LayerTimes(fwd, bwd, recompute, _recompute_flops(node, samples, tp, checkpoint))

    def data_parallel_times(self, node: LayerNode, samples: int, dp: int, tp: int, zero: int,
                            checkpoint: str) -> tuple[LayerTimes, float] | None:
        """Layer times under data parallelism as timed in situ (profiler/in_situ.py): the
        forward and backward of a micro-batch with the gathers, hooks and copies of its ZeRO
        stage, and the seconds the gradient sync adds to a step of one micro-batch (once per
        step under ZeRO 0 and 1, after every micro-batch under 2 and 3). None when the profile
        has no such points (then the collectives are priced apart, communication.py).
        Recomputation is the plain forward: the backward's gather already holds the weights."""
        layer, key = self.layers.get(node.signature), data_parallel_key(node, samples, dp, tp,
                                                                         zero)
        if layer is None or key is None:
            return None
        found = layer.data_parallel_s(*key[1:4], samples)
        if found is None:
            return None
        fwd, bwd, sync = (seconds * self.core_share for seconds in found)
        plain = self._measured(node, samples, key[2], checkpoint)
        return LayerTimes(fwd, bwd, plain.recompute_s, plain.recompute_flops), sync

    def _analytic(self, node: LayerNode, samples: int, tp: int, sequence_parallel: bool,
                  checkpoint: str) -> LayerTimes:
        work = layer_pass_work(node, samples, tp, self.elt_bytes, sequence_parallel)
        fwd = pass_time_s(work.fwd_flops, work.fwd_bytes, self.device)
        bwd = pass_time_s(work.bwd_flops, work.bwd_bytes, self.device)
        recompute = 0.0
        if checkpoint == "full":
            recompute = fwd
        elif checkpoint == "selective":
            flop_div, byte_div = tp_shards(node, tp, sequence_parallel)
            recompute = pass_time_s(samples * node.attn_fwd_flops / flop_div,
                                    samples * node.attn_fwd_io_bytes / byte_div, self.device)
        return LayerTimes(fwd, bwd, recompute, _recompute_flops(node, samples, tp, checkpoint))

    @property
    def oversubscribed(self) -> bool:
        """True when a node's ranks need more threads than it has cores: communication (on
        gloo, CPU work) then takes cores that compute would use, so it cannot hide behind
        compute."""
        return self.rank_threads is not None and self.rank_threads > 1

    def waiting_relief(self, busy: float) -> float:
        """Factor on a step's time when its ranks are busy only a `busy` share of it (pipeline
        bubbles): a waiting rank sleeps in recv and leaves its core to the others, so the
        busy ones share the cores among busy x ranks (same rule as core_share)."""
        if not self.oversubscribed or busy >= 1:
            return 1.0
        return max(1.0, busy * self.rank_threads) / self.rank_threads

    def optimizer_s(self, node: LayerNode, tp: int, optimizer: str) -> float | None:
        """Measured seconds of one optimizer step over `node` at `tp` (in-situ profiles),
        scaled by the core share like the layer's times; None when not measured."""
        layer = self.layers.get(node.signature)
        if layer is None:
            return None
        seconds = layer.optimizer_s(tp if node.kind in TP_SHARDED_KINDS else 1, optimizer)
        return None if seconds is None else seconds * self.core_share


def core_share(cluster: Cluster, profile: Profile) -> float:
    """How much slower a layer runs in the cluster's processes than when it was profiled:
    when a node's processes need more threads than it has cores, they share them, and each
    computes at cores / (processes x threads) of its rate alone (measured on this 2-core
    machine: 4 one-thread ranks take 2x, ../shared/NOTES-torch.md). A profile timed in situ
    already shared the cores among its ranks_timing processes. 1 on GPUs."""
    cores = cluster.device.cores_per_node
    if cores is None or profile.machine is None:
        return 1.0
    threads = profile.machine.threads
    return max(1.0, cluster.gpus_per_node * threads / cores) / \
        max(1.0, profile.machine.ranks_timing * threads / cores)


def _recompute_flops(node: LayerNode, samples: int, tp: int, checkpoint: str) -> float:
    flop_div = tp_shards(node, tp)[0]
    per_sample = {"none": 0.0, "selective": node.attn_fwd_flops, "full": node.fwd_flops}
    return samples * per_sample[checkpoint] / flop_div
