"""The Profile: what the cost model knows about a model on a machine, saved as JSON.

Every number is measured (mode "measure") or derived from a preset's stated figures (mode
"analytic"); the raw points are kept beside the fits made from them. Units are SI: seconds,
bytes, bytes/s.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autoplan import __version__
from autoplan.errors import AutoplanError, choices_hint
from autoplan.formats import check_version, first_error
from autoplan.io import atomic_write_text

__all__ = [
    "PROFILE_FORMAT_VERSION", "COLLECTIVES", "bus_factor", "check_collectives", "TimePoint",
    "LinearFit", "fit_line",
    "fits_from_points", "LayerMemory",
    "OptimizerPoint", "DataParallelPoint", "LayerProfile", "CommPoint", "CommRegime",
    "CommFit", "Machine",
    "Profile", "load_profile",
]

# 2: CommFit holds a list of regimes (1: alpha_s, bandwidth and optional large_* fields).
# 3: LayerProfile.data_parallel (in-situ times under the executor's data parallelism).
# Version-1 and version-2 files still load (Profile._known_version).
PROFILE_FORMAT_VERSION = 3
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
Collective = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"]
_FROZEN = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # numbers are finite


def check_collectives(names: Sequence[str]) -> None:
    """Raises AutoplanError naming the first of `names` that is not one of COLLECTIVES."""
    unknown = sorted(set(names) - set(COLLECTIVES))
    if unknown:
        raise AutoplanError(f"unknown collective '{unknown[0]}'{choices_hint(COLLECTIVES)}")


def bus_factor(collective: str, group_size: int) -> float:
    """busbw / algbw for a collective over n ranks (nccl-tests doc/PERFORMANCE.md).

    A ring all-reduce moves 2(n-1)/n of the buffer over each rank's link, all-gather and
    reduce-scatter (n-1)/n, all-to-all (n-1)/n (what leaves each rank); send/recv moves it once.
    """
    n = group_size
    match collective:
        case "all_reduce":
            return 2 * (n - 1) / n
        case "all_gather" | "reduce_scatter" | "all_to_all":
            return (n - 1) / n
        case "send_recv":
            return 1.0
        case _:
            raise AutoplanError(f"unknown collective '{collective}'{choices_hint(COLLECTIVES)}")


class TimePoint(BaseModel):
    """Forward and backward time of one layer at one micro-batch size and TP degree."""

    model_config = _FROZEN
    micro_batch: int = Field(ge=1)
    tp: int = Field(ge=1)
    fwd_s: float = Field(ge=0, description="median over repeats (in situ: per pass of all "
                         "ranks at once, profiler/in_situ.py)")
    bwd_s: float = Field(ge=0, description="as fwd_s")
    fwd_spread_s: float = Field(0.0, ge=0, description="max - min over repeats")
    bwd_spread_s: float = Field(0.0, ge=0, description="max - min over repeats")
    repeats: int = Field(1, ge=1)


class LinearFit(BaseModel):
    """time = intercept_s + per_sample_s * micro_batch (least squares over the points)."""

    model_config = _FROZEN
    tp: int = Field(ge=1)
    fwd_intercept_s: float
    fwd_per_sample_s: float
    bwd_intercept_s: float
    bwd_per_sample_s: float

    def fwd_s(self, micro_batch: float) -> float:
        return max(self.fwd_intercept_s + self.fwd_per_sample_s * micro_batch, 0.0)

    def bwd_s(self, micro_batch: float) -> float:
        return max(self.bwd_intercept_s + self.bwd_per_sample_s * micro_batch, 0.0)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x; returns (a, b). With one distinct x: a = 0, b = mean(y) / x."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, mean_y / mean_x
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    return mean_y - slope * mean_x, slope


def fits_from_points(points: list[TimePoint] | list[DataParallelPoint]) -> list[LinearFit]:
    """One LinearFit per TP degree among the points, by least squares over micro-batches."""
    fits = []
    for tp in sorted({p.tp for p in points}):
        mine = [p for p in points if p.tp == tp]
        xs = [float(p.micro_batch) for p in mine]
        fwd = fit_line(xs, [p.fwd_s for p in mine])
        bwd = fit_line(xs, [p.bwd_s for p in mine])
        fits.append(LinearFit(tp=tp, fwd_intercept_s=fwd[0], fwd_per_sample_s=fwd[1],
                              bwd_intercept_s=bwd[0], bwd_per_sample_s=bwd[1]))
    return fits


class LayerMemory(BaseModel):
    """Bytes of one layer at tp = 1; sharded figures divide by the degrees (cost model)."""

    model_config = _FROZEN
    params: int = Field(ge=0)
    param_bytes: int = Field(ge=0)
    grad_bytes: int = Field(ge=0)
    optimizer_bytes: dict[str, int] = Field(
        description="state bytes after one step, keyed 'adamw/fp32', 'sgd/bf16', 'adamw/mixed'...")
    act_bytes_per_sample: int = Field(ge=0, description="saved for backward")
    act_bytes_per_sample_ckpt: int = Field(ge=0, description="saved with full checkpointing")
    peak_fwd_bytes_per_sample: int = Field(
        0, ge=0, description="highest allocated bytes during forward, from its start")
    peak_bwd_bytes_per_sample: int = Field(
        0, ge=0, description="highest allocated bytes during backward, from forward's start "
        "(what forward left alive included)")
    cuda_max_allocated_bytes: int | None = Field(None, description="torch.cuda, when on a GPU")


class OptimizerPoint(BaseModel):
    """One optimizer step over a layer's parameters (one TP rank's shard), measured."""

    model_config = _FROZEN
    tp: int = Field(ge=1)
    optimizer: str = Field(description="e.g. adamw (one tensor at a time, as autoplan run "
                           "steps it)")
    step_s: float = Field(ge=0, description="per step of all ranks at once")


class DataParallelPoint(BaseModel):
    """One layer under the executor's data parallelism (replicate for ZeRO 0, fully_shard for
    1 to 3) on a dp x tp layout, timed in situ (profiler/in_situ.py): a micro-batch's forward
    and backward as a step runs all but its last (no gradient sync; ZeRO 3's gathers, hooks
    and copies included), and the backward of the last, which syncs the gradients."""

    model_config = _FROZEN
    dp: int = Field(ge=2)
    tp: int = Field(ge=1)
    zero: int = Field(ge=0, le=3)
    micro_batch: int = Field(ge=1, description="samples on one rank")
    fwd_s: float = Field(ge=0, description="per pass of all ranks at once")
    bwd_s: float = Field(ge=0, description="per pass of all ranks at once, gradient sync off")
    sync_bwd_s: float = Field(ge=0, description="the same, gradient sync on")


class LayerProfile(BaseModel):
    """One distinct layer signature: its time points, fits and memory."""

    model_config = _FROZEN
    signature: str
    kind: str
    names: list[str] = Field(description="the layers that share this signature")
    points: list[TimePoint]
    fits: list[LinearFit] = Field(description="one per TP degree profiled")
    memory: LayerMemory
    optimizer: list[OptimizerPoint] = Field(
        default_factory=list, description="optimizer step times per TP degree (in-situ "
        "profiles; empty otherwise)")
    data_parallel: list[DataParallelPoint] = Field(
        default_factory=list, description="times under data parallelism per (dp, tp, ZeRO) "
        "(in-situ profiles; empty otherwise)")

    def optimizer_s(self, tp: int, optimizer: str) -> float | None:
        """Measured seconds of one `optimizer` step over this layer at `tp`, if timed."""
        return next((p.step_s for p in self.optimizer
                     if p.tp == tp and p.optimizer == optimizer), None)

    def data_parallel_s(self, dp: int, tp: int, zero: int,
                        micro_batch: float) -> tuple[float, float, float] | None:
        """(forward, backward, gradient sync) seconds of one micro-batch of `micro_batch`
        samples per rank under data parallelism, from the in-situ points of that layout and
        ZeRO stage: the point of that micro-batch where one was timed (so that a plan's price
        rests on its own points alone, whichever others a profile holds), else forward and
        backward by least squares over micro-batches (as `fits`) and the sync as the mean
        extra time of a syncing backward. None when not measured."""
        mine = [p for p in self.data_parallel if (p.dp, p.tp, p.zero) == (dp, tp, zero)]
        if not mine:
            return None
        exact = next((p for p in mine if p.micro_batch == micro_batch), None)
        if exact is not None:
            return exact.fwd_s, exact.bwd_s, max(exact.sync_bwd_s - exact.bwd_s, 0.0)
        (fit,) = fits_from_points(mine)  # one layout: one tp
        sync = statistics.fmean(p.sync_bwd_s - p.bwd_s for p in mine)
        return fit.fwd_s(micro_batch), fit.bwd_s(micro_batch), max(sync, 0.0)

    def fit(self, tp: int) -> LinearFit:
        """The fit at `tp`; raises KeyError when that degree was not profiled."""
        for fit in self.fits:
            if fit.tp == tp:
                return fit
        raise KeyError(f"layer {self.names[0]}: tp {tp} not profiled "
                       f"(have {[f.tp for f in self.fits]})")


class CommPoint(BaseModel):
    """One timed collective: median time and nccl-tests style bandwidths."""

    model_config = _FROZEN
    collective: Collective
    group_size: int = Field(ge=2)
    scope: Literal["intra", "inter"] = "intra"
    nbytes: int = Field(ge=1, description="message size per rank, as nccl-tests counts it")
    time_s: float = Field(ge=0)
    spread_s: float = Field(0.0, ge=0)
    algbw: float = Field(ge=0, description="nbytes / time_s, bytes/s")
    busbw: float = Field(ge=0, description="algbw x the collective's bus factor, bytes/s")


class CommRegime(BaseModel):
    """One regime of a CommFit: time = alpha_s + nbytes / bandwidth from from_bytes up, to the
    next regime's from_bytes."""

    model_config = _FROZEN
    from_bytes: int = Field(ge=0, description="the smallest message size of the regime; "
                            "0 for the first")
    alpha_s: float = Field(description="intercept: the latency (>= 0) in the first regime; "
                           "later ones may be negative, since their line applies only from "
                           "from_bytes, where its time is positive")
    bandwidth: float = Field(gt=0, description="effective bytes/s of the message size")

    def time_s(self, nbytes: float) -> float:
        # the alpha-beta model (Hockney 1994, "The communication challenge for MPP")
        return self.alpha_s + nbytes / self.bandwidth


# The version-1 fields of a CommFit (alpha_s, bandwidth, then an optional second regime):
# still accepted, as the one-line form analytic fits are built with and as old files hold.
_V1_LARGE_FIELDS = ("large_from_bytes", "large_alpha_s", "large_bandwidth")


class CommFit(BaseModel):
    """Piecewise alpha-beta time of one collective, group size and scope.

    Each regime is a line time = alpha_s + nbytes / bandwidth over a range of message sizes
    (from its from_bytes to the next one's); measured fits have as many regimes as the data
    support (profiler.comm.fit_alpha_beta), analytic ones one. Call time_s: it picks the
    regime. alpha_s and bandwidth are the first regime's (latency, small-message bandwidth).

    Built from the one-line form CommFit(..., alpha_s=, bandwidth=, busbw=) too, and from a
    version-1 profile's fields (that form plus large_from_bytes, large_alpha_s and
    large_bandwidth for a second regime).
    """

    model_config = _FROZEN
    collective: Collective
    group_size: int = Field(ge=2)
    scope: Literal["intra", "inter"] = "intra"
    regimes: list[CommRegime] = Field(min_length=1, description="by from_bytes, rising; "
                                      "the first from 0")
    busbw: float = Field(ge=0, description="peak bus bandwidth seen, bytes/s")

    @model_validator(mode="before")
    @classmethod
    def _from_line_fields(cls, data: Any) -> Any:
        """The one-line (and version-1) form as regimes; other input is left to the fields."""
        if not isinstance(data, dict) or "regimes" in data or "alpha_s" not in data:
            return data
        data = dict(data)
        large = [data.pop(name, None) for name in _V1_LARGE_FIELDS]
        regimes = [{"from_bytes": 0, "alpha_s": data.pop("alpha_s"),
                    "bandwidth": data.pop("bandwidth", None)}]
        if any(v is not None for v in large):
            if any(v is None for v in large):
                raise ValueError("large_from_bytes, large_alpha_s and large_bandwidth are set "
                                 "together or not at all")
            regimes.append(dict(zip(("from_bytes", "alpha_s", "bandwidth"), large,
                                    strict=True)))
        return data | {"regimes": regimes}

    @model_validator(mode="after")
    def _regimes_in_order(self) -> CommFit:
        first, later = self.regimes[0], self.regimes[1:]
        if first.from_bytes != 0 or first.alpha_s < 0:
            raise ValueError(f"the first regime starts at {first.from_bytes} B with latency "
                             f"{first.alpha_s} s; it must start at 0 B with a latency >= 0")
        starts = [r.from_bytes for r in self.regimes]
        if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
            raise ValueError(f"regimes start at {starts} B; they must rise")
        for regime in later:
            if regime.time_s(regime.from_bytes) <= 0:
                raise ValueError(f"the regime from {regime.from_bytes} B has a time that is "
                                 f"not positive there")
        return self

    @property
    def alpha_s(self) -> float:
        """The first regime's latency."""
        return self.regimes[0].alpha_s

    @property
    def bandwidth(self) -> float:
        """The first regime's bandwidth, bytes/s."""
        return self.regimes[0].bandwidth

    def regime_at(self, nbytes: float) -> CommRegime:
        """The regime a message of nbytes falls in: the last one starting at or below it."""
        regime = self.regimes[0]
        for later in self.regimes[1:]:
            if nbytes < later.from_bytes:
                break
            regime = later
        return regime

    def time_s(self, nbytes: float) -> float:
        """Seconds for a message of nbytes, by its regime's line."""
        return self.regime_at(nbytes).time_s(nbytes)


class Machine(BaseModel):
    model_config = _FROZEN
    hostname: str
    platform: str
    python: str
    torch: str
    device: str = Field(description="cpu, or the CUDA device name")
    threads: int = Field(ge=1, description="torch threads per process while measuring")
    ranks_timing: int = Field(1, ge=1, description="processes that timed each layer at once: "
                              "1 alone; more in situ (profiler/in_situ.py), where tp > 1 "
                              "times include the TP collectives and DTensor dispatch")


class Profile(BaseModel):
    """A versioned profile: layers (by signature), collectives, the machine and cluster."""

    model_config = _FROZEN
    version: int = PROFILE_FORMAT_VERSION
    mode: Literal["measure", "analytic"]
    model: str
    model_hash: str
    dtype: str
    cluster: dict[str, Any] = Field(description="the Cluster it describes (Cluster.to_dict)")
    machine: Machine | None = None
    autoplan_version: str = __version__
    created: str = ""
    layers: list[LayerProfile]
    comm_points: list[CommPoint] = Field(default_factory=list)
    comm: list[CommFit] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="sources and caveats")

    @model_validator(mode="before")
    @classmethod
    def _known_version(cls, data: Any) -> Any:
        """Refuse other versions, but read versions 1 and 2: version 1's comm fits convert
        themselves (CommFit._from_line_fields), and version 3 only adds a field with a
        default (LayerProfile.data_parallel)."""
        old = isinstance(data, dict) and type(data.get("version")) is int and \
            data["version"] in (1, 2)
        if old:
            data = data | {"version": PROFILE_FORMAT_VERSION}
        check_version(data, "profile", PROFILE_FORMAT_VERSION)
        return data

    @property
    def content_hash(self) -> str:
        """Hash of everything but the creation time: equal profiles hash equal."""
        body = self.model_dump(exclude={"created"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def layer(self, signature: str) -> LayerProfile:
        for layer in self.layers:
            if layer.signature == signature:
                return layer
        raise KeyError(f"no layer with signature {signature} in the profile of {self.model}")

    def comm_fit(self, collective: str, group_size: int, scope: str = "intra") -> CommFit:
        for fit in self.comm:
            if (fit.collective, fit.group_size, fit.scope) == (collective, group_size, scope):
                return fit
        raise KeyError(f"no {scope} {collective} fit for {group_size} ranks in the profile")

    def to_json(self) -> str:
        return json.dumps(self.model_dump() | {"content_hash": self.content_hash}, indent=1)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")


def load_profile(path: str | Path) -> Profile:
    """Read a profile.json (or a folder holding one).

    Raises:
        AutoplanError: on a missing file, another format version or a bad field.
    """
    path = Path(path)
    path = path / "profile.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise AutoplanError(f"profile '{path}' cannot be read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise AutoplanError(f"profile '{path}' is not JSON: {err}") from None
    if isinstance(data, dict):
        data.pop("content_hash", None)
    try:
        return Profile.model_validate(data)
    except ValidationError as err:
        raise AutoplanError(f"profile '{path}': {first_error(err)}") from None
