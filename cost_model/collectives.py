"""Time of one collective on a placed group: a measured α-β fit where the profile has one,
else the analytic NCCL model of the cluster's preset (cost_model/analytic.py)."""

from __future__ import annotations

from functools import lru_cache

from autoplan.cluster import Cluster
from autoplan.cost_model.analytic import collective_fit
from autoplan.cost_model.placement import place_group
from autoplan.errors import AutoplanError
from autoplan.profile import CommFit, Profile, bus_factor

__all__ = ["CommModel"]


class CommModel:
    """Collective times on `cluster`, from `profile`'s fits when it has them."""

    def __init__(self, cluster: Cluster, profile: Profile | None = None) -> None:
        self.cluster = cluster
        self.measured: dict[tuple[str, str], list[CommFit]] = {}
        for fit in profile.comm if profile else ():
            self.measured.setdefault((fit.collective, fit.scope), []).append(fit)
        self._fit = lru_cache(maxsize=None)(self._find_fit)

    def time_s(self, collective: str, nbytes: float, size: int, stride: int = 1) -> float:
        """Seconds for `collective` moving `nbytes` (nccl-tests convention: the whole buffer
        of an all-reduce, the gathered output of an all-gather, the input of a
        reduce-scatter, the message of a send/recv) over `size` ranks `stride` apart."""
        if size < 2 or nbytes <= 0:
            return 0.0
        fit, scale = self._fit(collective, size, stride)
        # the fit's message with the same bus bytes; it also picks a piecewise fit's regime
        return fit.time_s(nbytes * scale)

    def _find_fit(self, collective: str, size: int, stride: int) -> tuple[CommFit, float]:
        """The fit to use and a factor on its per-byte time: 1 for an exact group size; for a
        measured fit of another size, the ratio of bus factors (busbw is the same link's,
        nccl-tests doc/PERFORMANCE.md)."""
        place = place_group(self.cluster, size, stride)
        fits = self.measured.get((collective, place.scope)) or self.measured.get(
            (collective, "intra"))
        if fits:
            nearest = min(fits, key=lambda f: (abs(f.group_size - size), -f.group_size))
            scale = (bus_factor(collective, size) / bus_factor(collective, nearest.group_size)
                     if nearest.group_size != size else 1.0)
            return nearest, scale
        device = self.cluster.device
        if device.intra_node_bandwidth is None and device.inter_node_bandwidth is None:
            raise AutoplanError(f"no {collective} figures for {size} ranks on "
                                f"'{self.cluster.spec}': give --profile with measured "
                                "collectives (autoplan profile)")
        per_node = place.ranks_per_node if place.scope == "inter" else None
        return collective_fit(collective, size, place.scope, self.cluster, per_node), 1.0
