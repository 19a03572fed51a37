"""`autoplan validate` with the settings of the validation issue: 4 local processes, a GPT
whose blocks take milliseconds, at least 10 plans. Writes benchmarks/results/validate/
(plans.csv, scatter.png, profile/, summary.json with the command and the machine's load).

    .venv/bin/python benchmarks/validate.py
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from autoplan.app.validate import ValidateOptions, validate, write_outputs
from autoplan.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "validate"
MODEL = "gpt:layers=4,hidden=256,heads=4,seq=128,vocab=1024"


def main() -> int:
    options = ValidateOptions(model=MODEL, nproc=4, global_batch=16, top_k=10, steps=8,
                              warmup=3, output=str(RESULTS))
    load_before, started = os.getloadavg(), time.perf_counter()
    result = validate(options, lambda text: print(text, flush=True))
    write_outputs(result, RESULTS)
    summary = result.to_dict() | {
        "command": f"autoplan validate --model '{MODEL}' --nproc 4 --global-batch 16 "
                   "--top-k 10 --steps 8 --warmup 3 -o benchmarks/results/validate",
        "wall_s": round(time.perf_counter() - started),
        "load_average_before": load_before, "load_average_after": os.getloadavg()}
    atomic_write_text(RESULTS / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"MAPE {result.mape:.1%}, Spearman {result.spearman:.2f}, regret {result.regret:.2f}, "
          f"memory error {result.memory_error:.1%} over {len(result.plans)} plans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
