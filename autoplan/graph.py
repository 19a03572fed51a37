"""LayerGraph: the units that parallel strategies apply to, with their sizes and costs.

A node is a unit (embedding, transformer block, final norm, head, loss, or any module a
user's model is made of); an edge carries the activation bytes that flow from one unit to
the next. All per-sample figures are for one sample of the traced shape.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from autoplan.errors import AutoplanError
from autoplan.formats import check_version
from autoplan.io import atomic_write_text

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["GRAPH_FORMAT_VERSION", "LayerNode", "LayerEdge", "LayerGraph"]

GRAPH_FORMAT_VERSION = 2
"""2: each node records what running it needs (tie group, tp facts, layout changes, pipeline
cuts) and the graph its parameters outside every layer; version 1 lacks them."""


@dataclass(frozen=True)
class LayerNode:
    name: str
    """Fully qualified module name (the key in the state dict); "loss" for the loss."""
    kind: str
    """embedding | block | norm | head | loss | other."""
    module_type: str
    signature: str
    """Equal for units of identical structure and cost: the search ties their choices."""
    params: int
    """Parameters this unit owns (a tied weight is counted at its first user)."""
    shared_params: int
    """Parameters this unit uses but an earlier unit owns (tied weights)."""
    param_bytes: int
    fwd_flops: float
    """Forward FLOPs per sample (matmul-class ops, as torch.utils.flop_counter counts them)."""
    bwd_flops: float
    """Backward FLOPs per sample, measured, not assumed to be 2x forward."""
    act_bytes: int
    """Bytes saved for backward per sample (deduplicated storages, parameters excluded); a
    storage an earlier unit already saved (often this unit's input) counts there only."""
    act_bytes_fixed: int
    """Bytes saved for backward that do not grow with the batch."""
    input_bytes: int
    """Bytes of the tensors passed in per sample: what full checkpointing keeps."""
    output_bytes: int
    output_shape: tuple[int, ...]
    """Shape of the first output tensor at batch 1."""
    calls: int = 1
    fwd_io_bytes: int = 0
    """Bytes per sample that non-matmul, non-view ops read and write in forward (eager, as
    traced: what memory-bound kernels move); 0 in graphs from before it was recorded."""
    bwd_io_bytes: int = 0
    """The same for backward (tensors shaped like a parameter left out: weight gradients)."""
    attn_act_bytes: int = 0
    """Saved bytes per sample of S x S tensors (attention scores, probabilities, their
    dropout): what selective recomputation drops (Korthikanti et al. 2022, sec. 4.2)."""
    attn_fwd_flops: float = 0.0
    """Forward FLOPs per sample of the ops that make or read S x S tensors: the work that
    selective recomputation repeats."""
    attn_fwd_io_bytes: int = 0
    """Forward non-matmul bytes per sample moved by ops on S x S tensors."""
    # What running the node needs (recorded by tracing; autoplan.feasibility reads them).
    tie_group: str = ""
    """The first layer holding a parameter this one shares (tied weights; itself for that
    first layer), "" when it shares none: a tie group must take one (dp, tp) layout."""
    tp_divides: tuple[int, ...] = ()
    """Sizes every tensor-parallel degree of this node must divide (split widths, heads)."""
    tp_refusal: str = ""
    """Why tp > 1 cannot split this node correctly ("" when it can, or stays whole)."""
    tp_whole_params: int = 0
    """Parameters its tensor-parallel plan keeps whole on every TP rank (norms, row-parallel
    biases): a rank holds (params - these) / tp + these. 0 in graphs from before it was
    recorded."""
    tp_whole_grad_params: int = 0
    """Parameters its tensor-parallel plan splits whose gradient torch makes whole on every
    TP rank: an Embedding split by vocabulary (torch 2.13's DTensor has no rule for
    embedding_dense_backward that splits the vocabulary, torch/distributed/tensor/_ops/
    _embedding_ops.py, so the gradient is whole until data parallelism reduces it). 0 for
    a tied one: the gradient of the other use (an output head's, split by rows) comes first
    and the sum keeps its split (measured: tests/cost_model/test_memory_vs_executor.py)."""
    tp_whole_act_bytes: float | None = None
    """Bytes per sample it saves for backward that its tensor-parallel plan leaves whole on
    every TP rank (tp_plan.saved_shares: a block's norm inputs and outputs, residual sums);
    None when not recorded (cost_model/memory.py then counts Korthikanti's five hidden
    states)."""
    tp_gathered_act_bytes: float | None = None
    """Of those, the inputs of column-parallel Linears: whole also under torch's sequence
    parallelism, which saves them gathered (None: not recorded)."""
    layout_refusal: str = ""
    """Why the (dp, tp) layout cannot change at this node, i.e. why the value a layout hop
    would move is not the activation of the layers before it ("" when it can)."""
    min_samples: int = 1
    """Samples each rank must get per micro-batch (2 for a BatchNorm in training mode,
    which refuses one value per channel)."""
    cut_refusal: str = ""
    """Why a pipeline stage cannot start at this node ("" when it can): one tensor, its
    first positional input, crosses a stage boundary (executor/pipeline.py)."""


@dataclass(frozen=True)
class LayerEdge:
    src: str
    dst: str
    bytes: int
    """Activation bytes per sample that flow from src to dst."""


@dataclass(frozen=True)
class LayerGraph:
    """The units of a model in execution order, as a frozen value that saves to JSON."""

    model: str
    dtype: str
    attention: str
    """How attention was traced: "flash" (fused kernel, as on GPUs) or "math"."""
    tokens_per_sample: int | None
    nodes: tuple[LayerNode, ...]
    edges: tuple[LayerEdge, ...]
    loose_params: tuple[str, ...] = ()
    """Parameters held outside every layer (e.g. a class token on the model itself): every
    pipeline stage holds a copy, but no single layout owns them, so layouts cannot differ."""
    version: int = GRAPH_FORMAT_VERSION
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {n.name: i for i, n in enumerate(self.nodes)})

    @cached_property
    def digraph(self) -> nx.DiGraph:
        """The graph as networkx sees it (imported on first use: it costs a third of a
        second, which `autoplan estimate` from a saved graph does not need)."""
        import networkx as nx

        graph = nx.DiGraph()
        for index, node in enumerate(self.nodes):
            graph.add_node(node.name, index=index, **asdict(node))
        for edge in self.edges:
            graph.add_edge(edge.src, edge.dst, bytes=edge.bytes)
        return graph

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def __getitem__(self, name: str) -> LayerNode:
        return self.nodes[self.index[name]]

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def by_signature(self) -> dict[str, list[LayerNode]]:
        """signature -> its layers, in graph order: the distinct layers to profile once."""
        groups: dict[str, list[LayerNode]] = {}
        for node in self.nodes:
            groups.setdefault(node.signature, []).append(node)
        return groups

    @property
    def params(self) -> int:
        return sum(n.params for n in self.nodes)

    @property
    def fwd_flops(self) -> float:
        return sum(n.fwd_flops for n in self.nodes)

    @property
    def flops_per_token(self) -> float | None:
        """Forward FLOPs per token (training costs about 3x: forward plus backward)."""
        return self.fwd_flops / self.tokens_per_sample if self.tokens_per_sample else None

    @cached_property
    def structural_hash(self) -> str:
        """Identifies the model's structure: unit names, kinds, signatures, sizes and edges."""
        parts = [(n.name, n.kind, n.signature, n.params, n.output_shape) for n in self.nodes]
        parts += [(e.src, e.dst) for e in self.edges]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "version": self.version, "model": self.model, "dtype": self.dtype,
            "attention": self.attention, "tokens_per_sample": self.tokens_per_sample,
            "structural_hash": self.structural_hash,
            "nodes": [asdict(n) for n in self.nodes], "edges": [asdict(e) for e in self.edges],
            "loose_params": list(self.loose_params),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "layer graph") -> LayerGraph:
        """Rebuild a graph from to_dict() output, checking every field's type.

        Raises:
            AutoplanError: on another format version, a missing, unknown or mistyped field,
                repeated layer names or an edge between unknown layers.
        """
        check_version(data, source, GRAPH_FORMAT_VERSION)
        top = _fields_of(data, source, "", _GRAPH_FIELDS, required=("model", "nodes", "edges"))
        for key in ("nodes", "edges"):
            if not isinstance(top[key], list):
                raise AutoplanError(f"{source}: {key} must be a list, got {_short(top[key])}")
        nodes = tuple(LayerNode(**_fields_of(n, source, f"nodes[{i}].", _NODE_FIELDS))
                      for i, n in enumerate(top["nodes"]))
        edges = tuple(LayerEdge(**_fields_of(e, source, f"edges[{i}].", _EDGE_FIELDS))
                      for i, e in enumerate(top["edges"]))
        names = [n.name for n in nodes]
        if len(set(names)) != len(names):
            raise AutoplanError(f"{source}: layer names repeat")
        for edge in edges:
            if edge.src not in names or edge.dst not in names:
                raise AutoplanError(f"{source}: edge {edge.src} -> {edge.dst} names an unknown "
                                    "layer")
        loose = top.get("loose_params", [])
        if not isinstance(loose, list) or not all(isinstance(n, str) for n in loose):
            raise AutoplanError(f"{source}: loose_params must be a list of names, got "
                                f"{_short(loose)}")
        return cls(top["model"], top.get("dtype", "bfloat16"), top.get("attention", "flash"),
                   top.get("tokens_per_sample"), nodes, edges, tuple(loose))

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LayerGraph:
        """Read a graph.json that save() wrote.

        Raises:
            AutoplanError: when the file cannot be read, is not JSON or not a layer graph.
        """
        source = f"layer graph '{path}'"
        try:
            data = json.loads(Path(path).read_text())
        except OSError as err:
            raise AutoplanError(f"{source} cannot be read: {err.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AutoplanError(f"{source} is not JSON: {err}") from None
        return cls.from_dict(data, source)


# ------------------------------------------------------------------ checking loaded fields


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_amount(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _is_shape(value: object) -> bool:
    return isinstance(value, list | tuple) and all(_is_count(v) for v in value)


_CHECKS = {"str": (lambda v: isinstance(v, str), "a string"),
           "int": (_is_count, "an integer >= 0"),
           "float": (_is_amount, "a finite number >= 0"),
           "tuple[int, ...]": (_is_shape, "a list of integers >= 0"),
           "int | None": (lambda v: v is None or _is_count(v), "an integer >= 0 or null"),
           "float | None": (lambda v: v is None or _is_amount(v), "a finite number >= 0 or null")}
_NODE_FIELDS = {f.name: f.type for f in fields(LayerNode)}
_EDGE_FIELDS = {f.name: f.type for f in fields(LayerEdge)}
_GRAPH_FIELDS = {"version": None, "structural_hash": None, "model": "str", "dtype": "str",
                 "attention": "str", "tokens_per_sample": "int | None", "nodes": None,
                 "edges": None, "loose_params": None}


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fields_of(data: object, source: str, where: str, types: dict[str, str | None],
               required: tuple[str, ...] | None = None) -> dict:
    """`data` as keyword arguments, each field checked against its annotated type."""
    if not isinstance(data, dict):
        raise AutoplanError(f"{source}: {where.rstrip('.') or 'the document'} must be an "
                            f"object, got {_short(data)}")
    unknown = [key for key in data if key not in types]
    if unknown:
        raise AutoplanError(f"{source}: unknown field {where}{_short(unknown[0])}")
    if required is None:
        required = tuple(f for f in types if f in _REQUIRED)
    missing = [key for key in required if key not in data]
    if missing:
        raise AutoplanError(f"{source}: missing field {where}{missing[0]}")
    out = {}
    for key, value in data.items():
        kind = types[key]
        if kind is not None:
            check, wanted = _CHECKS[kind]
            if not check(value):
                raise AutoplanError(f"{source}: {where}{key} must be {wanted}, got "
                                    f"{_short(value)}")
        out[key] = tuple(value) if kind == "tuple[int, ...]" else value
    return out


_REQUIRED = {f.name for cls in (LayerNode, LayerEdge) for f in fields(cls)
             if f.default is MISSING}
