"""A Profile for people and programs: DIR/profile.json, pandas-readable DIR/layers.csv and
DIR/comm.csv (and DIR/data_parallel.csv from in-situ profiles), and the summary tables
`autoplan profile` prints."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.table import Table

from autoplan import fmt
from autoplan.io import atomic_write_text
from autoplan.profile import CommPoint, Profile

__all__ = ["layers_frame", "data_parallel_frame", "comm_frame", "write_profile",
           "profile_tables"]


def layers_frame(profile: Profile) -> pd.DataFrame:
    """One row per layer signature and time point, with the layer's memory beside it."""
    rows = []
    for layer in profile.layers:
        memory = layer.memory.model_dump(exclude={"optimizer_bytes"})
        optimizer = {f"optimizer_bytes[{k}]": v for k, v in layer.memory.optimizer_bytes.items()}
        for point in layer.points:
            rows.append({"signature": layer.signature, "kind": layer.kind,
                         "first_layer": layer.names[0], "layers": len(layer.names),
                         **point.model_dump(), **memory, **optimizer})
    return pd.DataFrame(rows)


def data_parallel_frame(profile: Profile) -> pd.DataFrame:
    """One row per layer signature and in-situ point under data parallelism."""
    return pd.DataFrame([{"signature": layer.signature, "kind": layer.kind,
                          "first_layer": layer.names[0], **point.model_dump()}
                         for layer in profile.layers for point in layer.data_parallel])


def comm_frame(profile: Profile) -> pd.DataFrame:
    """One row per timed collective, with the regime of its group's alpha-beta fit that
    covers its size beside it; an analytic profile (fits only) gets one row per regime."""
    fits = {(f.collective, f.group_size, f.scope): f for f in profile.comm}
    rows = []
    for point in profile.comm_points:
        fit = fits.get((point.collective, point.group_size, point.scope))
        regime = fit.regime_at(point.nbytes) if fit else None
        rows.append(point.model_dump() | {
            "fit_from_bytes": regime.from_bytes if regime else None,
            "fit_alpha_s": regime.alpha_s if regime else None,
            "fit_bandwidth": regime.bandwidth if regime else None,
            "fit_time_s": fit.time_s(point.nbytes) if fit else None})
    if not rows:  # analytic profiles have fits only
        rows = [f.model_dump(exclude={"regimes"}) | regime.model_dump()
                for f in profile.comm for regime in f.regimes]
    return pd.DataFrame(rows, columns=None if rows else list(CommPoint.model_fields))


def write_profile(profile: Profile, folder: str | Path) -> list[Path]:
    """Write the files atomically (data_parallel.csv only where there are such points);
    returns their paths."""
    folder = Path(folder)
    paths = [folder / "profile.json", folder / "layers.csv", folder / "comm.csv"]
    profile.save(paths[0])
    atomic_write_text(paths[1], layers_frame(profile).to_csv(index=False))
    atomic_write_text(paths[2], comm_frame(profile).to_csv(index=False))
    data_parallel = data_parallel_frame(profile)
    if not data_parallel.empty:
        paths.append(folder / "data_parallel.csv")
        atomic_write_text(paths[3], data_parallel.to_csv(index=False))
    return paths


def profile_tables(profile: Profile) -> list[Table]:
    """A layer table (time at the smallest micro-batch, per TP degree) and a collective table."""
    layers = Table(title=f"{profile.model}: {profile.mode} profile, {profile.dtype}"
                   + (f", {profile.machine.device}" if profile.machine else ""))
    for column in ("layer", "kind", "x", "tp", "fwd (mb=1)", "bwd (mb=1)", "fwd/sample",
                   "saved act/sample", "ckpt act/sample"):
        layers.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for layer in profile.layers:
        for fit in layer.fits:
            mem = layer.memory
            layers.add_row(layer.names[0], layer.kind, str(len(layer.names)), str(fit.tp),
                           fmt.seconds(fit.fwd_s(1)), fmt.seconds(fit.bwd_s(1)),
                           fmt.seconds(fit.fwd_per_sample_s), fmt.nbytes(mem.act_bytes_per_sample),
                           fmt.nbytes(mem.act_bytes_per_sample_ckpt))
    comm = Table(title="collectives: time = alpha + bytes / bandwidth, per regime of sizes")
    for column in ("collective", "ranks", "scope", "from", "alpha", "bandwidth", "peak busbw"):
        comm.add_column(column, justify="left" if column in ("collective", "scope") else "right")
    for fit in profile.comm:
        for regime in fit.regimes:
            comm.add_row(fit.collective, str(fit.group_size), fit.scope,
                         fmt.nbytes(regime.from_bytes), fmt.seconds(regime.alpha_s),
                         f"{fmt.nbytes(regime.bandwidth)}/s", f"{fmt.nbytes(fit.busbw)}/s")
    return [layers, comm] if profile.comm else [layers]
