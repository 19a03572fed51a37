"""benchmarks/gpu/check.py --smoke: the GPU check's every step on the CPU at toy sizes, so
that the script is whole when a GPU comes (issue 20)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "check.py"),
                          "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["installed"] == []  # all there already: nothing taken from the wheels
    assert "skipped" in report["tests"]["summary"]  # the gpu tests, without a GPU
    assert report["profiles"]["layers"] and "error" not in report["profiles"]["layers"][0]
    assert [p["plan"] for p in report["plans"]] == [
        f"dp=1,micro_batch=1,ckpt={c}" for c in ("none", "selective", "full")]
    assert all(p["measured_s"] > 0 and p["predicted_s"] > 0 for p in report["plans"])
    ranks = report["dry_runs"][0]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 4] and all(r["peak"] > 0 for r in ranks)
    assert "| dry run |" in (tmp_path / "check.md").read_text()
