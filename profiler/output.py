"""Write a Profile as DIR/profile.json plus pandas-readable DIR/layers.csv and DIR/comm.csv."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from autoplan.io import atomic_write_text
from autoplan.profiler.profile import CommPoint, Profile

__all__ = ["layers_frame", "comm_frame", "write_profile"]


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


def comm_frame(profile: Profile) -> pd.DataFrame:
    """One row per timed collective, with the alpha-beta fit of its group beside it."""
    fits = {(f.collective, f.group_size, f.scope): f for f in profile.comm}
    rows = []
    for point in profile.comm_points:
        fit = fits.get((point.collective, point.group_size, point.scope))
        rows.append(point.model_dump() | {
            "fit_alpha_s": fit.alpha_s if fit else None,
            "fit_bandwidth": fit.bandwidth if fit else None,
            "fit_time_s": fit.time_s(point.nbytes) if fit else None})
    if not rows:  # analytic profiles have fits only
        rows = [f.model_dump() for f in profile.comm]
    return pd.DataFrame(rows, columns=None if rows else list(CommPoint.model_fields))


def write_profile(profile: Profile, folder: str | Path) -> list[Path]:
    """Write the three files atomically; returns their paths."""
    folder = Path(folder)
    paths = [folder / "profile.json", folder / "layers.csv", folder / "comm.csv"]
    profile.save(paths[0])
    atomic_write_text(paths[1], layers_frame(profile).to_csv(index=False))
    atomic_write_text(paths[2], comm_frame(profile).to_csv(index=False))
    return paths
