"""autoplan.app: the application floor, on top of every other package.

The CLI and its commands (inspect, profile, estimate, search, run, validate, plot, export),
`autoplan.auto`, and the tables they print. Each command turns strings into a Workload
(autoplan/workload.py), calls the domain packages' typed fronts and writes files.
"""
