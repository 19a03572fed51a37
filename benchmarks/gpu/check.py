"""The GPU check: what only a GPU shows, in one script for whenever a GPU is lent (most of the
time none is). It finishes within 10 minutes on one H100.

    python3 benchmarks/gpu/check.py [--smoke] [--out DIR]

1. Installs what the GPU machine lacks (pulp, highspy, pydantic, and this package without
   its dependencies) from benchmarks/gpu/wheels/, which benchmarks/gpu/fetch_wheels.sh fills
   here beforehand (the GPU machine has no network; the folder is ignored by git and
   travels with the checkout).
2. The `gpu`-marked tests (pytest -m gpu).
3. A measured profile of a GPT on the GPU against the analytic one for the same device:
   each layer's forward and backward time, measured over predicted.
4. Single-GPU plans (no, selective and full checkpointing x micro-batch 1, 2, 4): predicted
   (from the measured profile) vs measured step time and torch.cuda.max_memory_allocated.
5. True-scale dry runs with real tensors on the GPU (`autoplan run --dry-run`): each rank's
   measured peak, max_memory_allocated and step time beside the prediction.

Every step runs the autoplan CLI in a subprocess with a time limit; a step that fails is
recorded with its error and the next one runs. Results: DIR/check.json and DIR/check.md
(DIR: benchmarks/results/gpu/<device name>, or results/gpu/smoke on the CPU).

--smoke runs the same steps on the CPU at toy sizes, so that the script is tested here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
WHEELS = Path(__file__).resolve().parent / "wheels"
NEEDED = ("pulp", "highspy", "pydantic")

FULL = {
    "device": "cuda",
    "model": "gpt:layers=12,hidden=1024,heads=16,seq=1024,vocab=32768",
    "micro_batches": (1, 2, 4),
    "dry_runs": [("llama3-8b", "dp=4,tp=8,pp=2,micro_batch=1,zero=1", 64, "h100-sxm:gpus=64"),
                 ("gpt3-1.7b", "dp=16,tp=4,pp=4,zero=1,micro_batch=1", 64,
                  "h100-sxm:gpus=256")],
    "limit_s": 240,
    "tests": "tests",
}
SMOKE = {
    "device": "cpu",
    "model": "gpt-tiny",
    "micro_batches": (1,),
    "dry_runs": [("gpt-tiny", "dp=2,tp=2,pp=2,micro_batch=1", 8, "h100-sxm:gpus=8")],
    "limit_s": 120,
    "tests": "tests/executor/test_dry_run.py",  # where the gpu-marked tests are: quick to collect
}


def install_missing() -> list[str]:
    """pip-install from WHEELS whatever of NEEDED does not import, then this package
    without dependencies; returns what it installed."""
    missing = []
    for name in NEEDED:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                        "--find-links", str(WHEELS), *missing], check=True)
    if subprocess.run([sys.executable, "-c", "import autoplan"], capture_output=True,
                      cwd="/").returncode:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "-e", str(ROOT)], check=True)
        missing.append("autoplan")
    return missing


def _autoplan(args: list[str], limit_s: float) -> dict[str, Any]:
    """One CLI call: its JSON output (or text), exit code and seconds."""
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "autoplan", *args], capture_output=True,
                             text=True, timeout=limit_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"args": args, "error": f"timed out after {limit_s} s"}
    seconds = time.perf_counter() - start
    if out.returncode not in (0, 1):
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"args": args, "error": tail, "seconds": seconds}
    try:
        return {"args": args, "result": json.loads(out.stdout), "seconds": seconds}
    except json.JSONDecodeError:
        return {"args": args, "text": out.stdout[-2000:], "seconds": seconds}


def gpu_tests(cfg: dict) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                          "no:cacheprovider", cfg["tests"]], capture_output=True, text=True,
                         timeout=cfg["limit_s"], cwd=ROOT)
    return {"exit": out.returncode, "summary": (out.stdout.strip().splitlines() or [""])[-1]}


def profiles(cfg: dict, folder: Path) -> dict[str, Any]:
    """Measured and analytic profiles of cfg's model on this device, layer by layer."""
    measured, analytic = folder / "profile-measured", folder / "profile-analytic"
    mbs = ",".join(map(str, cfg["micro_batches"]))
    runs = {
        "measured": _autoplan(["profile", "--model", cfg["model"], "--device", cfg["device"],
                               "--micro-batches", mbs, "--tp", "1", "--no-comm",
                               "--dtype", "fp32", "-o", str(measured)], cfg["limit_s"]),
        "analytic": _autoplan(["profile", "--model", cfg["model"], "--mode", "analytic",
                               "--cluster", "h100-sxm:gpus=1", "--dtype", "fp32", "-o",
                               str(analytic)], cfg["limit_s"]),
    }
    rows = []
    try:
        import pandas as pd

        m = pd.read_csv(measured / "layers.csv")
        a = pd.read_csv(analytic / "layers.csv")
        both = m.merge(a, on=["signature", "micro_batch", "tp"], suffixes=("", "_analytic"))
        for r in both.itertuples():
            rows.append({"layer": r.first_layer, "micro_batch": r.micro_batch,
                         "fwd_ratio": r.fwd_s / r.fwd_s_analytic if r.fwd_s_analytic else None,
                         "bwd_ratio": r.bwd_s / r.bwd_s_analytic if r.bwd_s_analytic else None})
    except (OSError, KeyError, ValueError) as err:
        rows.append({"error": str(err)})
    return runs | {"layers": rows}


def single_gpu_plans(cfg: dict, folder: Path) -> list[dict[str, Any]]:
    out = []
    for ckpt in ("none", "selective", "full"):
        for mb in cfg["micro_batches"]:
            plan = f"dp=1,micro_batch={mb},ckpt={ckpt}"
            run = _autoplan(["run", "--model", cfg["model"], "--plan", plan, "--global-batch",
                             str(2 * mb), "--steps", "6", "--warmup", "2", "--device",
                             cfg["device"], "--profile", str(folder / "profile-measured"),
                             "--force", "--json"], cfg["limit_s"])
            out.append({"plan": plan} | _run_summary(run))
    return out


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    if "result" not in run:
        return {"error": run.get("error", "no JSON")}
    r = run["result"]
    pred = r.get("prediction") or {}
    memory = r["ranks"][0]
    stage = (pred.get("stages") or [{}])[0]
    return {"measured_s": r["step_time_s"], "predicted_s": pred.get("step_time_s"),
            "max_allocated": memory.get("max_allocated"), "predicted_peak": stage.get("peak")}


def dry_runs(cfg: dict) -> list[dict[str, Any]]:
    out = []
    for model, plan, batch, cluster in cfg["dry_runs"]:
        run = _autoplan(["run", "--model", model, "--plan", plan, "--global-batch", str(batch),
                         "--cluster", cluster, "--device", cfg["device"], "--dry-run",
                         "--rank", "all-stages", "--json"], cfg["limit_s"])
        out.append({"model": model, "plan": plan, "cluster": cluster}
                   | ({"ranks": run["result"]["ranks"], "tensors": run["result"]["tensors"]}
                      if "result" in run else {"error": run.get("error")}))
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"GPU check on {report['device_name']} with torch {report['torch']} (the suite "
             f"runs on 2.13, the floor) in {report['seconds']:.0f} s; command: `python3 "
             f"benchmarks/gpu/check.py{' --smoke' if report['smoke'] else ''}`",
             "", f"gpu tests: {report['tests']['summary']}", "",
             "| plan | predicted | measured | max allocated | predicted peak |",
             "|---|---|---|---|---|"]
    for p in report["plans"]:
        if "error" in p:
            lines.append(f"| {p['plan']} | failed: {p['error']} | | | |")
            continue
        pred = f"{p['predicted_s'] * 1e3:.1f} ms" if p["predicted_s"] else "-"
        alloc = f"{p['max_allocated'] / 2**20:.0f} MiB" if p["max_allocated"] else "-"
        peak = f"{p['predicted_peak'] / 2**20:.0f} MiB" if p["predicted_peak"] else "-"
        lines.append(f"| {p['plan']} | {pred} | {p['measured_s'] * 1e3:.1f} ms | {alloc} | "
                     f"{peak} |")
    lines += ["", "| dry run | rank | peak (counted) | max allocated | predicted peak |",
              "|---|---|---|---|---|"]
    for d in report["dry_runs"]:
        for r in d.get("ranks", []):
            pred = (r.get("predicted") or {}).get("peak")
            alloc = f"{r['max_allocated'] / 2**30:.2f} GiB" if r["max_allocated"] else "-"
            peak = f"{pred / 2**30:.2f} GiB" if pred else "-"
            lines.append(f"| {d['model']} {d['plan']} | {r['rank']} | "
                         f"{r['peak'] / 2**30:.2f} GiB | {alloc} | {peak} |")
        if "error" in d:
            lines.append(f"| {d['model']} {d['plan']} | failed: {d['error']} | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the same steps, on the CPU, "
                        "at toy sizes")
    parser.add_argument("--out", help="results folder (default: by device)")
    args = parser.parse_args()
    start = time.perf_counter()
    installed = install_missing()
    import torch

    cfg = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu/check.py: no CUDA device here; --smoke runs it on the CPU")
    name = torch.cuda.get_device_name() if cfg["device"] == "cuda" else "cpu (smoke)"
    folder = Path(args.out) if args.out else \
        ROOT / "benchmarks" / "results" / "gpu" / name.replace(" ", "_").lower()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AUTOPLAN_CACHE_DIR", str(folder / "graph-cache"))
    report = {"device_name": name, "smoke": args.smoke, "torch": torch.__version__,
              "installed": installed, "tests": gpu_tests(cfg),
              "profiles": profiles(cfg, folder)}
    report["plans"] = single_gpu_plans(cfg, folder)
    report["dry_runs"] = dry_runs(cfg)
    report["seconds"] = time.perf_counter() - start
    (folder / "check.json").write_text(json.dumps(report, indent=1, default=str))
    (folder / "check.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
