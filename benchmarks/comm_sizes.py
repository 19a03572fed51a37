"""Collectives fitted at the sizes a model's plans are priced at, against the whole default
range: the held-out error of both fits on the same measured points.

`autoplan profile` times the collectives at the powers of 2 around the messages the cost
model prices for the model (app/profile.priced_comm_sizes), not at every power of 2 from
1 KiB to 128 MiB, and only the collectives it prices on groups whose size divides the node.
This reads the points of benchmarks/results/comm_fit.csv (benchmarks/comm_fit.py: every
power of 2 of the default range and the held-out sizes 1.5 x between them, measured in one
run), refits each series on the fit sizes the model's profile keeps, and compares, at the
held-out sizes inside that range (the sizes its plans are priced at), the error of that fit
with the error of the fit on the whole range (comm_fit.csv's own error column).

    .venv/bin/python benchmarks/comm_sizes.py [--points benchmarks/results/comm_fit.csv]

Writes benchmarks/results/comm_sizes.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from autoplan.app.profile import ProfileOptions, priced_comm_sizes
from autoplan.cost_model.communication import PRICED_COLLECTIVES
from autoplan.profile import CommPoint
from autoplan.profiler.comm import fit_alpha_beta
from autoplan.workload import load_graph

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["gpt:layers=4,hidden=256,heads=4,seq=128,vocab=1024",
          "gpt:layers=12,hidden=384,heads=6,seq=256,vocab=4096"]
TARGET_ERROR = 0.25  # as benchmarks/comm_fit.py
KEY = ["nproc", "collective", "group_size", "scope"]


def _errors(points: pd.DataFrame, fit_sizes: tuple[int, ...]) -> pd.DataFrame:
    """Held-out points between the first and last fit size, with the error of a refit on
    `fit_sizes` alone (error_model) beside the whole-range fit's (error)."""
    low, high = fit_sizes[0], fit_sizes[-1]
    rows = []
    for key, series in points.groupby(KEY, sort=False):
        asked = series.nbytes  # as asked: groups of 2 and 4 round no size of 1 KiB up
        train = series[asked.isin(fit_sizes)]
        fit = fit_alpha_beta([CommPoint(**r) for r in
                              train[list(CommPoint.model_fields)].to_dict("records")])[0]
        held = series[(series.role == "heldout") & (asked > low) & (asked < high)]
        rows += [dict(zip(KEY, key, strict=True)) | {
            "nbytes": int(p.nbytes), "error": p.error,
            "error_model": fit.time_s(int(p.nbytes)) / p.time_s - 1}
            for p in held.itertuples()]
    return pd.DataFrame(rows)


def _line(model: str, errors: pd.DataFrame, sizes: tuple[int, ...]) -> str:
    n = len(errors)
    within = int((errors.error.abs() <= TARGET_ERROR).sum())
    within_model = int((errors.error_model.abs() <= TARGET_ERROR).sum())
    return (f"| `{model}` | {sizes[0]} B .. {sizes[-1]} B ({len(sizes)}) | {n} | "
            f"{within}/{n}, median {errors.error.abs().median():.1%}, max "
            f"{errors.error.abs().max():.1%} | {within_model}/{n}, median "
            f"{errors.error_model.abs().median():.1%}, max "
            f"{errors.error_model.abs().max():.1%} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=str(RESULTS / "comm_fit.csv"))
    args = parser.parse_args()
    table = pd.read_csv(args.points)
    # what a profile of 4 local ranks times now: the priced collectives, groups dividing 4
    table = table[table.collective.isin(PRICED_COLLECTIVES)
                  & (table.nproc % table.group_size == 0)]
    defaults = ProfileOptions(model=MODELS[0])
    lines = ["# Collectives fitted at a model's priced sizes vs the whole default range", "",
             f"Points: `{args.points}` (measured by benchmarks/comm_fit.py, its command and "
             "machine in comm_fit.md), the collectives the cost model prices "
             f"({', '.join(PRICED_COLLECTIVES)}) on groups whose size divides the world "
             "(2 of 2; 2 and 4 of 4). Each model's fit sizes: app/profile.priced_comm_sizes "
             f"at the profile's defaults (micro-batches {defaults.micro_batches}, tp "
             f"{defaults.tps}, fp32). Held-out: the 1.5 x sizes inside that range. Error = "
             f"predicted / measured - 1; within {TARGET_ERROR:.0%} counts as comm_fit.md "
             "does.", "",
             "Command: `.venv/bin/python benchmarks/comm_sizes.py`", "",
             "| model | fit sizes (count) | held-out points | fit on every power of 2, 1 KiB "
             "- 128 MiB (18 sizes) | fit on the model's sizes |",
             "|---|---|---|---|---|"]
    for model in MODELS:
        graph = load_graph(model, dtype="fp32")
        sizes = priced_comm_sizes(graph, defaults.micro_batches, defaults.tps, 4)
        lines.append(_line(model, _errors(table, sizes), sizes))
    text = "\n".join(lines) + "\n"
    (RESULTS / "comm_sizes.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
