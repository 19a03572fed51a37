"""The Plan: how each layer of a model is parallelised, as a versioned JSON document.

Batch convention: a step processes `global_batch` samples as `num_micro_batches`
micro-batches of `micro_batch_size` samples each; inside a pipeline stage a layer with
data-parallel degree dp gives each of its ranks micro_batch_size / dp samples. The shorthand
`micro_batch=` is the per-rank size (Megatron's convention) for the plan's uniform dp.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autoplan import __version__
from autoplan.errors import AutoplanError
from autoplan.feasibility import gives_whole_output, last_layer, plan_refusal
from autoplan.formats import check_version, first_error
from autoplan.graph import LayerGraph
from autoplan.io import atomic_write_text, utc_now
from autoplan.specs import parse_bool, parse_int, parse_kv

__all__ = [
    "PLAN_FORMAT_VERSION", "CHECKPOINT_MODES", "SCHEDULES", "LayerStrategy", "LayerPlan",
    "Prediction", "Provenance", "Plan", "parse_plan_shorthand", "uniform_plan", "split_stages",
    "pipeline_units", "stage_chunks",
    "load_plan", "check_plan", "plan_from_json",
]

PLAN_FORMAT_VERSION = 1
CHECKPOINT_MODES = ("none", "selective", "full")
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
Checkpoint = Literal["none", "selective", "full"]
Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
_FROZEN = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # numbers are finite


class LayerStrategy(BaseModel):
    """How one layer runs inside its pipeline stage: dp x tp = the stage's devices."""

    model_config = _FROZEN
    dp: int = Field(ge=1, description="data-parallel degree")
    tp: int = Field(ge=1, description="tensor-parallel degree")
    sequence_parallel: bool = Field(False, description="shard norms/dropout by sequence (tp>1)")
    zero: int = Field(0, ge=0, le=3,
                      description="ZeRO stage: 0 none, 1 optimizer, 2 +grads, 3 +params")
    checkpoint: Checkpoint = Field("none", description="activation checkpointing")

    @model_validator(mode="after")
    def _sequence_parallel_needs_tp(self) -> LayerStrategy:
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel needs tp > 1")
        return self


class LayerPlan(LayerStrategy):
    name: str = Field(description="the layer's name in the LayerGraph (module FQN)")


class Prediction(BaseModel):
    model_config = _FROZEN
    step_time_s: float = Field(ge=0)
    tokens_per_s: float = Field(ge=0)
    mfu: float = Field(ge=0)
    peak_memory_bytes: list[int] = Field(description="one figure per pipeline stage")


class Provenance(BaseModel):
    model_config = _FROZEN
    autoplan_version: str = __version__
    profile_hash: str | None = None
    created: str = Field(default_factory=utc_now)


class Plan(BaseModel):
    """A complete plan for one model on one world size; validated on construction."""

    model_config = _FROZEN
    version: int = PLAN_FORMAT_VERSION
    model: str = Field(description="model spec")
    model_hash: str | None = Field(None, description="LayerGraph.structural_hash")
    cluster: str | None = None
    world_size: int = Field(ge=1)
    global_batch: int = Field(ge=1)
    micro_batch_size: int = Field(ge=1, description="samples per micro-batch, all dp ranks")
    num_micro_batches: int = Field(ge=1)
    pp: int = Field(ge=1)
    virtual_stages: int = Field(1, ge=1, description="model chunks per pipeline rank")
    schedule: Schedule = "1f1b"
    stage_boundaries: list[int] = Field(description="index of the first layer of each chunk")
    layers: list[LayerPlan]
    prediction: Prediction | None = None
    provenance: Provenance = Field(default_factory=Provenance)

    @model_validator(mode="before")
    @classmethod
    def _known_version(cls, data: Any) -> Any:
        check_version(data, "plan", PLAN_FORMAT_VERSION)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        _check_batch(self)
        _check_pipeline(self)
        _check_layers(self)
        return self

    @property
    def stage_gpus(self) -> int:
        return self.world_size // self.pp

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")


def _check_batch(plan: Plan) -> None:
    if plan.micro_batch_size * plan.num_micro_batches != plan.global_batch:
        raise ValueError(f"micro_batch_size {plan.micro_batch_size} x num_micro_batches "
                         f"{plan.num_micro_batches} must equal global_batch {plan.global_batch}")


def _check_pipeline(plan: Plan) -> None:
    if plan.world_size % plan.pp:
        raise ValueError(f"pp {plan.pp} does not divide world_size {plan.world_size}")
    if plan.virtual_stages > 1 and plan.schedule != "interleaved_1f1b":
        raise ValueError("virtual_stages > 1 needs schedule interleaved_1f1b")
    chunks, bounds = plan.pp * plan.virtual_stages, plan.stage_boundaries
    if len(bounds) != chunks:
        raise ValueError(f"stage_boundaries has {len(bounds)} entries; pp x virtual_stages "
                         f"is {chunks}")
    rising = all(b < a for b, a in pairwise(bounds))
    if bounds[0] != 0 or not rising or bounds[-1] >= len(plan.layers):
        raise ValueError(f"stage_boundaries {bounds} must start at 0 and rise strictly below "
                         f"the {len(plan.layers)} layers")


def _check_layers(plan: Plan) -> None:
    names = [layer.name for layer in plan.layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names repeat")
    for layer in plan.layers:
        if layer.dp * layer.tp != plan.stage_gpus:
            raise ValueError(f"layer {layer.name}: dp {layer.dp} x tp {layer.tp} must equal the "
                             f"{plan.stage_gpus} devices of a stage (world_size / pp)")
        if plan.micro_batch_size % layer.dp:
            raise ValueError(f"layer {layer.name}: dp {layer.dp} does not divide the "
                             f"micro-batch of {plan.micro_batch_size} samples")


# --------------------------------------------------------------------------- loading


def plan_from_json(text: str, source: str = "plan") -> Plan:
    """Parse a plan JSON document.

    Raises:
        AutoplanError: naming the first bad field and why.
    """
    try:
        return Plan.model_validate_json(text)
    except ValidationError as err:
        raise AutoplanError(f"{source}: {first_error(err)}") from None


# --------------------------------------------------------------------------- shorthand

_SHORTHAND_KEYS = ("dp", "tp", "pp", "micro_batch", "ckpt", "zero", "schedule",
                   "sequence_parallel", "virtual_stages")


def parse_plan_shorthand(text: str) -> dict[str, Any]:
    """Parse "dp=16,tp=8,pp=8,micro_batch=2,ckpt=full,zero=1,schedule=1f1b" into typed values.

    Omitted keys are absent here and take their defaults in uniform_plan().

    Raises:
        AutoplanError: on unknown keys or values, listing the valid ones.
    """
    raw = parse_kv(text, "plan", _SHORTHAND_KEYS)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("dp", "tp", "pp", "micro_batch", "virtual_stages"):
            values[key] = parse_int(value, f"plan {key}")
        elif key == "zero":
            values[key] = parse_int(value, "plan zero", 0)
            if values[key] > 3:
                raise AutoplanError(f"plan zero must be 0, 1, 2 or 3, got {value}")
        elif key == "ckpt":
            values[key] = _choice(value, CHECKPOINT_MODES, "plan ckpt")
        elif key == "schedule":
            values[key] = _choice(value, SCHEDULES, "plan schedule")
        else:
            values[key] = parse_bool(value, f"plan {key}")
    return values


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise AutoplanError(f"{what} '{value}' is not one of {', '.join(choices)}")
    return value


def uniform_plan(values: dict[str, Any] | str, graph: LayerGraph, world_size: int,
                 global_batch: int, cluster: str | None = None) -> Plan:
    """Expand shorthand values into a full Plan with the same strategy on every layer.

    Defaults: tp=1, pp=1, dp fills the remaining devices, micro_batch=1 (per dp rank),
    ckpt=none, zero=0, schedule=1f1b, sequence_parallel=false, virtual_stages=1.
    Stages split the blocks evenly (see split_stages).

    Raises:
        AutoplanError: when degrees do not multiply to the world size or the batch does not
            divide into micro-batches.
    """
    values = parse_plan_shorthand(values) if isinstance(values, str) else values
    if world_size < 1 or global_batch < 1:
        raise AutoplanError(f"plan: world size {world_size} and global batch {global_batch} "
                            "must be at least 1")
    tp, pp = values.get("tp", 1), values.get("pp", 1)
    if world_size % (tp * pp):
        raise AutoplanError(f"plan: tp {tp} x pp {pp} does not divide the {world_size} devices")
    dp = values.get("dp", world_size // (tp * pp))
    if dp * tp * pp != world_size:
        raise AutoplanError(f"plan: dp {dp} x tp {tp} x pp {pp} = {dp * tp * pp}, but the "
                            f"world has {world_size} devices")
    per_rank = values.get("micro_batch", 1)
    if global_batch % (per_rank * dp):
        raise AutoplanError(f"plan: global batch {global_batch} does not divide into "
                            f"micro-batches of {per_rank} x dp {dp} samples")
    virtual = values.get("virtual_stages", 1)
    default_schedule = "interleaved_1f1b" if virtual > 1 else "1f1b"
    strategy = dict(dp=dp, tp=tp, sequence_parallel=values.get("sequence_parallel", False),
                    zero=values.get("zero", 0), checkpoint=values.get("ckpt", "none"))
    fields = dict(
        model=graph.model, model_hash=graph.structural_hash, cluster=cluster,
        world_size=world_size, global_batch=global_batch, micro_batch_size=per_rank * dp,
        num_micro_batches=global_batch // (per_rank * dp), pp=pp, virtual_stages=virtual,
        schedule=values.get("schedule", default_schedule),
        stage_boundaries=split_stages(graph, pp * virtual),
        layers=[{"name": node.name, **strategy, **_sequence_kept(graph, i, strategy)}
                for i, node in enumerate(graph.nodes)])
    try:
        return Plan.model_validate(fields)
    except ValidationError as err:
        raise AutoplanError(f"plan: {first_error(err)}") from None


def _sequence_kept(graph: LayerGraph, index: int, strategy: dict) -> dict:
    """Sequence parallelism stays off on the model's last layer when that would give the
    output in sequence slices (feasibility.gives_whole_output): SP applies where it can."""
    last = index == last_layer(graph.nodes)
    if last and strategy["sequence_parallel"] and not gives_whole_output(graph.nodes[index]):
        return {"sequence_parallel": False}
    return {}


def pipeline_units(graph: LayerGraph, chunks: int) -> list[int]:
    """The layers a pipeline of `chunks` chunks may start a chunk at: the blocks when there
    are at least `chunks` of them, else every layer but the loss (which goes with the last)."""
    blocks = [i for i, node in enumerate(graph.nodes) if node.kind == "block"]
    layers = [i for i, node in enumerate(graph.nodes) if node.kind != "loss"]
    return blocks if len(blocks) >= chunks else layers


def stage_chunks(boundaries: list[int], layers: int, pp: int) -> list[list[tuple[int, int]]]:
    """The chunks [first, last) each pipeline stage runs: chunk c (cut at `boundaries`, the
    first layer of each, over `layers` layers) on stage c mod pp, as Megatron interleaves."""
    ends = [*boundaries, layers]
    return [[(ends[c], ends[c + 1]) for c in range(stage, len(boundaries), pp)]
            for stage in range(pp)]


def split_stages(graph: LayerGraph, chunks: int) -> list[int]:
    """First-layer indices of `chunks` contiguous pieces holding equal numbers of blocks
    (the first piece takes what precedes the blocks, the last what follows them).

    Raises:
        AutoplanError: when there are fewer layers than pieces.
    """
    units = pipeline_units(graph, chunks)
    if len(units) < chunks:
        layers = sum(node.kind != "loss" for node in graph.nodes)
        raise AutoplanError(f"plan: {chunks} pipeline chunks need at least {chunks} layers; "
                            f"the model has {layers}")
    base, extra = divmod(len(units), chunks)
    starts, at = [0], 0
    for k in range(chunks - 1):
        at += base + (1 if k < extra else 0)
        starts.append(units[at])
    return starts


def load_plan(source: str, graph: LayerGraph | None = None, world_size: int | None = None,
              global_batch: int | None = None, cluster: str | None = None) -> Plan:
    """A Plan from a JSON file path or from shorthand text (which needs graph, world_size
    and global_batch to expand).

    Raises:
        AutoplanError: on unreadable files, bad fields, or missing context for shorthand.
    """
    if source.endswith(".json") or Path(source).is_file():
        try:
            text = Path(source).read_text()
        except OSError as err:
            raise AutoplanError(f"plan file '{source}' cannot be read: {err.strerror}") from None
        return plan_from_json(text, f"plan file '{source}'")
    if graph is None or world_size is None or global_batch is None:
        raise AutoplanError("a shorthand plan needs the model, the world size and the global batch")
    return uniform_plan(source, graph, world_size, global_batch, cluster)


def check_plan(plan: Plan, graph: LayerGraph, world_size: int | None = None) -> None:
    """Check a plan against the model and world it is about to run on.

    Raises:
        AutoplanError: naming the mismatch (model hash, layer names, world), or why the
            executor cannot run it (autoplan.feasibility: tp vs head counts among others).
    """
    if plan.model_hash and plan.model_hash != graph.structural_hash:
        raise AutoplanError(f"plan is for model {plan.model} (hash {plan.model_hash}); this "
                            f"model {graph.model} has hash {graph.structural_hash}")
    names = graph.names
    unknown = [layer.name for layer in plan.layers if layer.name not in graph]
    if unknown:
        raise AutoplanError(f"plan names layers the model does not have: {', '.join(unknown[:5])}")
    if [layer.name for layer in plan.layers] != names:
        missing = [n for n in names if n not in {layer.name for layer in plan.layers}]
        raise AutoplanError("plan layers do not match the model's in order"
                            + (f"; missing: {', '.join(missing[:5])}" if missing else ""))
    if world_size is not None and world_size != plan.world_size:
        raise AutoplanError(f"plan is for {plan.world_size} devices; this world has {world_size}")
    why = plan_refusal(plan, graph)
    if why:
        raise AutoplanError(f"the executor cannot run this plan: {why}")

