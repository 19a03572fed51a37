"""autoplan.cost_model: step time and per-rank memory of a Plan, with a breakdown.

Not built yet: the cost-model issue fills this package (see DESIGN.md).
"""
