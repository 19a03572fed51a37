"""Tables and JSON summaries that the CLI prints (rich renders them)."""

from __future__ import annotations

from dataclasses import asdict
from itertools import pairwise

from rich.table import Table

from autoplan import fmt
from autoplan.graph import LayerGraph, LayerNode
from autoplan.models import PRESETS, build_model, parse_model_spec
from autoplan.plan import Plan

__all__ = ["preset_rows", "models_table", "graph_summary", "layer_table", "plan_table"]


def preset_rows() -> list[dict]:
    """One dict per preset: family, shape, parameter count (counted on a meta build)."""
    rows = []
    for name, preset in PRESETS.items():
        module = build_model(parse_model_spec(name)).module
        params = sum(p.numel() for p in module.parameters())  # tied weights once
        rows.append({"name": name, "family": preset.family, **preset.options,
                     "params": params, "source": preset.source})
    return rows


def models_table(rows: list[dict]) -> Table:
    table = Table(title="Model presets (use the name as --model; override with name:key=value)")
    columns = ["name", "family", "params", "layers", "hidden", "heads", "kv_heads", "ffn",
               "seq", "vocab", "source"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("name", "family", "source")
                         else "right")
    for row in rows:
        cells = [fmt.count(row[c]) if c == "params" else str(row.get(c, "")) for c in columns]
        table.add_row(*cells)
    return table


def graph_summary(graph: LayerGraph, per_layer: bool) -> dict:
    """The JSON of `autoplan inspect --json`: totals, and the layers with per-token figures."""
    tokens = graph.tokens_per_sample or 1
    summary = {
        "model": graph.model, "structural_hash": graph.structural_hash, "dtype": graph.dtype,
        "attention": graph.attention, "tokens_per_sample": graph.tokens_per_sample,
        "params": graph.params, "flops_per_token": graph.fwd_flops / tokens,
        "train_flops_per_token": sum(n.fwd_flops + n.bwd_flops for n in graph.nodes) / tokens,
        "act_bytes_per_token": sum(n.act_bytes for n in graph.nodes) / tokens,
    }
    if per_layer:
        summary["layers"] = [asdict(n) | {"flops_per_token": n.fwd_flops / tokens,
                                          "act_bytes_per_token": n.act_bytes / tokens}
                             for n in graph.nodes]
        summary["edges"] = [asdict(e) for e in graph.edges]
    return summary


def _groups(nodes: tuple[LayerNode, ...], group: bool) -> list[list[LayerNode]]:
    """Consecutive layers of one signature form a group (shown as one row)."""
    groups: list[list[LayerNode]] = []
    for node in nodes:
        if group and groups and groups[-1][0].signature == node.signature:
            groups[-1].append(node)
        else:
            groups.append([node])
    return groups


def layer_table(graph: LayerGraph, group: bool = True) -> Table:
    """Per-layer parameters, FLOPs and activation bytes per token, with totals."""
    per = "token" if graph.tokens_per_sample else "sample"
    tokens = graph.tokens_per_sample or 1
    table = Table(title=f"{graph.model}: {len(graph.nodes)} layers, {graph.dtype}, "
                  f"{graph.attention} attention, hash {graph.structural_hash}",
                  show_footer=True)
    summary = graph_summary(graph, per_layer=False)
    table.add_column("layer", footer="total")
    table.add_column("kind")
    table.add_column("x", justify="right")
    table.add_column("params", justify="right", footer=fmt.count(graph.params))
    table.add_column(f"fwd FLOPs/{per}", justify="right",
                     footer=fmt.flops(summary["flops_per_token"]))
    table.add_column(f"bwd FLOPs/{per}", justify="right",
                     footer=fmt.flops(summary["train_flops_per_token"]
                                      - summary["flops_per_token"]))
    table.add_column(f"saved act/{per}", justify="right",
                     footer=fmt.nbytes(summary["act_bytes_per_token"]))
    table.add_column("output (batch 1)", justify="right")
    for nodes in _groups(graph.nodes, group):
        first, n = nodes[0], len(nodes)
        name = first.name if n == 1 else f"{first.name} .. {nodes[-1].name}"
        params = fmt.count(first.params) + (f" (+{fmt.count(first.shared_params)} tied)"
                                            if first.shared_params else "")
        table.add_row(name, first.kind, str(n), params, fmt.flops(first.fwd_flops / tokens),
                      fmt.flops(first.bwd_flops / tokens), fmt.nbytes(first.act_bytes / tokens),
                      "x".join(map(str, first.output_shape)) or "-")
    return table


def plan_table(plan: Plan) -> Table:
    """The per-layer strategies of a plan, consecutive equal ones grouped by stage."""
    table = Table(title=f"plan: {plan.world_size} devices, pp {plan.pp} ({plan.schedule}), "
                  f"{plan.num_micro_batches} micro-batches of {plan.micro_batch_size}")
    for column in ("stage", "layers", "dp", "tp", "sp", "zero", "ckpt"):
        table.add_column(column, justify="left" if column == "layers" else "right")
    bounds = [*plan.stage_boundaries, len(plan.layers)]
    for chunk, (start, stop) in enumerate(pairwise(bounds)):
        rows: list[list] = []
        for layer in plan.layers[start:stop]:
            key = (layer.dp, layer.tp, layer.sequence_parallel, layer.zero, layer.checkpoint)
            if rows and rows[-1][1] == key:
                rows[-1][0].append(layer.name)
            else:
                rows.append([[layer.name], key])
        for names, key in rows:
            label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
            table.add_row(str(chunk % plan.pp), label, *map(str, key))
    return table

