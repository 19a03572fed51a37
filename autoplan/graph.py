"""LayerGraph: the units that parallel strategies apply to, with their sizes and costs.

A node is a unit (embedding, transformer block, final norm, head, loss, or any module a
user's model is made of); an edge carries the activation bytes that flow from one unit to
the next. All per-sample figures are for one sample of the traced shape.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from autoplan.errors import AutoplanError
from autoplan.formats import check_version
from autoplan.io import atomic_write_text

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["GRAPH_FORMAT_VERSION", "LayerNode", "LayerEdge", "LayerGraph"]

GRAPH_FORMAT_VERSION = 1


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
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerGraph:
        """Rebuild a graph from to_dict() output.

        Raises:
            AutoplanError: on another format version or missing fields.
        """
        check_version(data, "layer graph", GRAPH_FORMAT_VERSION)
        try:
            nodes = tuple(LayerNode(**{**n, "output_shape": tuple(n["output_shape"])})
                          for n in data["nodes"])
            edges = tuple(LayerEdge(**e) for e in data["edges"])
            return cls(data["model"], data["dtype"], data["attention"],
                       data["tokens_per_sample"], nodes, edges)
        except (KeyError, TypeError) as err:
            raise AutoplanError(f"layer graph is malformed: {err}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LayerGraph:
        return cls.from_dict(json.loads(Path(path).read_text()))
