"""Which Linear layers of a unit tensor parallelism splits, as data (STYLE.md, item 4).

The rule, for any module: inside each parent module that holds two or more Linear
children, the last one (in definition order) is row-wise and the ones before it are
column-wise, when their shapes pair up (each column-wise input and the row-wise output have
the same width). That is Megatron's pairing (Shoeybi et al. 2019, section 3): q/k/v then the
output projection; up/gate then down. A unit that is itself an Embedding is split by
vocabulary rows, and a unit that is itself a Linear (an output head) by columns. Modules
the rule does not cover stay replicated and are listed; a user override replaces the rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

__all__ = ["COLWISE", "ROWWISE", "TPPlan", "infer_tp_plan"]

COLWISE = "colwise"
ROWWISE = "rowwise"


@dataclass(frozen=True)
class TPPlan:
    """Sub-module FQN (relative to the unit, "" for the unit itself) -> colwise/rowwise."""

    styles: dict[str, str] = field(default_factory=dict)
    replicated: tuple[str, ...] = ()
    """Linear or Embedding sub-modules the rule left whole."""

    @property
    def shardable(self) -> bool:
        return bool(self.styles)

    def max_degree_divides(self, unit: nn.Module, tp: int) -> bool:
        """True when every split dimension divides by tp."""
        for name, style in self.styles.items():
            module = unit.get_submodule(name)
            if isinstance(module, nn.Embedding):
                size = module.num_embeddings
            else:
                size = module.out_features if style == COLWISE else module.in_features
            if size % tp:
                return False
        return True


def infer_tp_plan(unit: nn.Module, override: dict[str, str] | None = None) -> TPPlan:
    """The TP plan of one unit (see the module docstring for the rule).

    Args:
        unit: the module of one LayerGraph node.
        override: sub-module FQN -> "colwise" | "rowwise", used instead of the rule.

    Raises:
        ValueError: when an override names a style other than colwise or rowwise.
    """
    if override is not None:
        bad = {k: v for k, v in override.items() if v not in (COLWISE, ROWWISE)}
        if bad:
            raise ValueError(f"tp override styles must be colwise or rowwise, got {bad}")
        return TPPlan(dict(override))
    if isinstance(unit, nn.Embedding):
        return TPPlan({"": ROWWISE})
    if isinstance(unit, nn.Linear):
        return TPPlan({"": COLWISE})
    styles: dict[str, str] = {}
    for parent_name, parent in unit.named_modules():
        linears = [(n, m) for n, m in parent.named_children() if isinstance(m, nn.Linear)]
        if len(linears) >= 2 and _pairs(linears):
            for index, (name, _) in enumerate(linears):
                fqn = f"{parent_name}.{name}" if parent_name else name
                styles[fqn] = ROWWISE if index == len(linears) - 1 else COLWISE
    leftover = tuple(n for n, m in unit.named_modules()
                     if isinstance(m, (nn.Linear, nn.Embedding)) and n not in styles)
    return TPPlan(styles, leftover)


def _pairs(linears: list[tuple[str, nn.Linear]]) -> bool:
    *cols, (_, row) = linears
    return all(col.in_features == row.out_features for _, col in cols)
