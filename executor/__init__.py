"""autoplan.executor: applies a Plan to a module with torch.distributed building blocks.

Not built yet: the executor issue fills this package (see DESIGN.md).
"""
