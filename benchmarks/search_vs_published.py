"""Does the search beat every published or documented setting under its own cost model?

For each setting (Korthikanti et al. 2022 Table 5, both recompute modes; Llama 3 405B as Meta
ran it on 8,192 and 16,384 H100s, Llama 3 paper Table 4, in every checkpointing x virtual
stage variant; the uniform plans README.md and the Makefile demo show) it prices the setting
with the cost model, searches the same model, cluster and batch under the same cost model,
and compares: ratio = setting / found, so >= 1 means the search wins or ties (issue 23: the
search must never lose to a plan its own cost model prices better). Only settings that fit
memory and pass the plan checker count; the others are listed with the reason.

    .venv/bin/python benchmarks/search_vs_published.py

Writes benchmarks/results/search_vs_published.csv and .md; exits 1, printing the losing rows,
when the search loses on a fitting setting, else 0.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from korthikanti import PRESETS, predict, published_rows  # noqa: E402

from autoplan.cluster import parse_cluster_spec  # noqa: E402
from autoplan.cost_model import CostModel, Estimate  # noqa: E402
from autoplan.errors import AutoplanError  # noqa: E402
from autoplan.graph import LayerGraph  # noqa: E402
from autoplan.io import atomic_write_text  # noqa: E402
from autoplan.plan import Plan, check_plan, uniform_plan  # noqa: E402
from autoplan.profile import Profile, load_profile  # noqa: E402
from autoplan.search.report import describe  # noqa: E402
from autoplan.search.search import Searcher, SearchOptions, SearchResult  # noqa: E402
from autoplan.workload import load_graph  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 1e-9
"""Relative slack for a tie: the two prices come from the same arithmetic."""
LLAMA3_GLOBAL_BATCH = 2048
"""16M tokens per step at seq 8192 (Llama 3 paper, Table 4)."""
LLAMA3_CLUSTERS = {8192: 64, 16384: 128}
"""H100s -> dp of Meta's tp8 pp16 setting (Llama 3 paper, Table 4)."""
VALIDATE_DIR = RESULTS / "validate"
VALIDATE_MODEL = "gpt:layers=4,hidden=256,heads=4,seq=128,vocab=1024"
"""README "Validation": this model on 4 local processes, global batch 16, its profile."""


@dataclass(frozen=True)
class Model:
    """A traced graph with what the plan checker and the search need beside it."""

    spec: str
    graph: LayerGraph
    profile: Profile | None = None
    profile_path: str | None = None


@dataclass(frozen=True)
class Setting:
    name: str
    model: Model
    cluster: str
    global_batch: int
    plan: str
    """Shorthand, as uniform_plan reads it."""


# ----------------------------------------------------------------------------- settings


def korthikanti_settings() -> list[Setting]:
    """Table 5's eight rows on a100-80g, priced as korthikanti.py prices them (traced there)."""
    graphs: dict[str, LayerGraph] = {}
    settings = []
    for row in published_rows():
        published = predict(row, graphs)
        name = PRESETS[row["model"]]
        model = Model(name + " (fp16, math attention)", graphs[name])
        setting = Setting(f"Korthikanti T5 {row['model']} {row['recompute']}", model,
                          f"a100-80g:gpus={row['gpus']}", int(row["global_batch"]),
                          _korthikanti_shorthand(row))
        _same_price(setting, published)
        settings.append(setting)
    return settings


def _korthikanti_shorthand(row: dict[str, str]) -> str:
    """The plan korthikanti.predict builds from a Table 5 row, as shorthand."""
    return (f"tp={row['tp']},pp={row['pp']},micro_batch={row['micro_batch']},"
            f"ckpt={row['recompute']},sequence_parallel={row['sequence_parallel']},"
            f"virtual_stages={row['interleave']}")


def _same_price(setting: Setting, published: Estimate) -> None:
    """Guard: the shorthand shown is the plan predict priced."""
    mine = _estimate(setting)[1]
    if mine is None or mine.step_time_s != published.step_time_s:
        raise SystemExit(f"{setting.name}: shorthand {setting.plan} prices "
                         f"{mine and mine.step_time_s}, predict gave {published.step_time_s}")


def llama3_settings() -> list[Setting]:
    """Meta's tp8 pp16 setting for 405B; checkpointing and virtual stages unpublished, so
    every variant (zero 1, SP, one sample per micro-batch and dp rank, as Megatron runs it)."""
    model = Model("llama3-405b (seq 8192)", load_graph("llama3-405b", seq=8192))
    settings = []
    for gpus, dp in LLAMA3_CLUSTERS.items():
        for ckpt in ("none", "selective", "full"):
            for virtual, schedule in ((1, "1f1b"), (2, "interleaved_1f1b")):
                plan = (f"dp={dp},tp=8,pp=16,micro_batch=1,zero=1,ckpt={ckpt},"
                        f"schedule={schedule},virtual_stages={virtual},sequence_parallel=true")
                settings.append(Setting(f"Llama 3 405B {gpus} ckpt {ckpt} v{virtual}", model,
                                        f"h100-sxm:gpus={gpus}", LLAMA3_GLOBAL_BATCH, plan))
    return settings


def readme_settings() -> list[Setting]:
    """The uniform plans README.md shows, each with the model and cluster its text gives."""
    llama70 = Model("llama3-70b", load_graph("llama3-70b"))
    # README "Plans" names no model; dp16 tp8 pp8 is 1024 GPUs, the size of its Llama 3 70B
    # search example (h100-sxm:gpus=1024, global batch 2048). Shown interleaved with
    # virtual_stages=2 (it once said schedule=1f1b, which no plan can be); 1F1B beside it.
    shown = "dp=16,tp=8,pp=8,micro_batch=2,ckpt=full,zero=1,sequence_parallel=true"
    readings = (("", ",schedule=interleaved_1f1b,virtual_stages=2"),
                (" (1f1b v1)", ",schedule=1f1b,virtual_stages=1"))
    settings = [Setting(f"README Plans{label}", llama70, "h100-sxm:gpus=1024", 2048, shown + tail)
                for label, tail in readings]
    graph = load_graph("llama3-8b")
    # Makefile demo (README: "a uniform plan checked against Llama 3 8B"): inspect names 64
    # GPUs and batch 512 but no cluster; h100-sxm is our choice.
    settings.append(Setting("Makefile demo llama3-8b", Model("llama3-8b", graph),
                            "h100-sxm:gpus=64", 512, "tp=8,pp=4,ckpt=full,zero=1"))
    return settings + validate_settings()


def validate_settings() -> list[Setting]:
    """README "Validation": the 12 plans run there (from its summary.json), priced with its
    measured profile, and `autoplan run`'s synopsis plan "dp=2,tp=2" (4 processes)."""
    graph = load_graph(VALIDATE_MODEL, dtype="fp32")
    profile_path = str(VALIDATE_DIR / "profile")
    profile = load_profile(profile_path)
    if profile.model_hash != graph.structural_hash:
        print(f"skipped the validation rows: {profile_path} is of hash {profile.model_hash}, "
              f"the model now traces to {graph.structural_hash}")
        return []
    model = Model(VALIDATE_MODEL + " (fp32)", graph, profile, profile_path)
    summary = json.loads((VALIDATE_DIR / "summary.json").read_text())
    plans = [(f"README validate #{i} {p['role']}", p["plan"])
             for i, p in enumerate(summary["plans"], 1)]
    plans.append(("README run synopsis", "dp=2,tp=2"))
    return [Setting(name, model, "local-cpu:procs=4", 16, plan) for name, plan in plans]


# ----------------------------------------------------------------------------- pricing


def _estimate(setting: Setting) -> tuple[str, Estimate | None]:
    """The plan checker's verdict ("ok" or its reason) and the cost model's price (None when
    the shorthand does not even expand to a plan)."""
    cluster = parse_cluster_spec(setting.cluster)
    try:
        plan = uniform_plan(setting.plan, setting.model.graph, cluster.gpus,
                            setting.global_batch, cluster.spec)
    except AutoplanError as err:
        return str(err), None
    verdict = _check(plan, setting.model, cluster.gpus)
    model = CostModel(setting.model.graph, cluster, setting.model.profile)
    return verdict, model.estimate(plan)


def _check(plan: Plan, model: Model, gpus: int) -> str:
    try:
        check_plan(plan, model.graph, world_size=gpus)
    except AutoplanError as err:
        return str(err)
    return "ok"


class Searches:
    """One search per (graph, cluster, batch): rows of the same case reuse it."""

    def __init__(self) -> None:
        self._done: dict[tuple, tuple[SearchResult, float]] = {}

    def get(self, setting: Setting) -> tuple[SearchResult, float]:
        key = (id(setting.model.graph), setting.model.profile_path, setting.cluster,
               setting.global_batch)
        if key not in self._done:
            started = time.perf_counter()
            result = Searcher(setting.model.graph, parse_cluster_spec(setting.cluster),
                              SearchOptions(global_batch=setting.global_batch),
                              setting.model.profile).run()
            self._done[key] = (result, time.perf_counter() - started)
        return self._done[key]


def measure(setting: Setting, searches: Searches) -> dict:
    """One table row: the setting's price, the search's plan and price, and their ratio."""
    verdict, estimate = _estimate(setting)
    result, wall_s = searches.get(setting)
    best, grid = result.best, result.baselines.get("grid")
    ratio = (estimate.step_time_s / best.estimate.step_time_s
             if estimate is not None and best is not None else None)
    return {
        "row": setting.name, "model": setting.model.spec, "cluster": setting.cluster,
        "global_batch": setting.global_batch, "setting": setting.plan,
        "setting_s": estimate and round(estimate.step_time_s, 4),
        "fits": "-" if estimate is None else ("yes" if estimate.fits else "no"),
        "checker": verdict, "found_plan": describe(best) if best else "none fits",
        "found_s": best and round(best.estimate.step_time_s, 4),
        "ratio": None if ratio is None else round(ratio, 4), "origin": best and best.origin,
        "grid_s": grid and round(grid.estimate.step_time_s, 4),
        "search_s": round(result.search_time_s, 2), "wall_s": round(wall_s, 2),
        "_counts": estimate is not None and estimate.fits and verdict == "ok",
        "_loses": ratio is None or ratio < 1 - TOLERANCE,
    }


# ----------------------------------------------------------------------------- output


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(_public(rows[0])), lineterminator="\n")
    writer.writeheader()
    writer.writerows(_public(r) for r in rows)
    return out.getvalue()


def _markdown(rows: list[dict], losing: list[dict], total_s: float) -> str:
    columns = ["row", "cluster", "global_batch", "setting", "setting_s", "fits", "checker",
               "found_plan", "found_s", "ratio", "origin", "search_s", "wall_s"]
    lines = ["# Search vs published and documented settings", "",
             "`.venv/bin/python benchmarks/search_vs_published.py`; ratio = setting / found "
             "(>= 1: the search wins or ties), both priced by the same cost model. search_s "
             "and wall_s belong to the one search a (model, cluster, batch) shares.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]) for c in columns) + " |")
    lines += ["", f"Search loses on {len(losing)} fitting setting(s)"
              + (": " + "; ".join(f"{r['row']} ({r['ratio']})" for r in losing) if losing
                 else "."), f"Total run time {total_s:.0f} s.", ""]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "" if value is None else str(value).replace("|", "/")


def main() -> int:
    started = time.perf_counter()
    settings = korthikanti_settings() + llama3_settings() + readme_settings()
    searches, rows = Searches(), []
    for setting in settings:
        rows.append(measure(setting, searches))
        r = rows[-1]
        print(f"{r['row']}: setting {r['setting_s']} s (fits {r['fits']}, {r['checker']}), "
              f"found {r['found_s']} s ({r['origin']}), ratio {r['ratio']}; "
              f"search {r['search_s']} s", flush=True)
    losing = [r for r in rows if r["_counts"] and r["_loses"]]
    total_s = time.perf_counter() - started
    atomic_write_text(RESULTS / "search_vs_published.csv", _csv(rows))
    atomic_write_text(RESULTS / "search_vs_published.md", _markdown(rows, losing, total_s))
    for r in losing:
        print(f"LOSES {r['row']}: {r['setting']} {r['setting_s']} s vs found {r['found_s']} s "
              f"({r['found_plan']}, {r['origin']}), ratio {r['ratio']}")
    print(f"{len(losing)} losing of {sum(r['_counts'] for r in rows)} fitting settings; "
          f"{total_s:.0f} s; wrote {RESULTS / 'search_vs_published.csv'} and .md")
    return 1 if losing else 0


if __name__ == "__main__":
    sys.exit(main())
