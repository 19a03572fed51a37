"""autoplan.search: the strategy space and the ILP and DP solvers that pick a Plan.

Not built yet: the search issue fills this package (see DESIGN.md).
"""
