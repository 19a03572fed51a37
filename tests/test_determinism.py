"""Issue 9, "Resources and determinism": the same inputs give the same plan, byte for byte,
timestamps aside (tests/search/test_search.py checks the same through the Python API)."""

from __future__ import annotations

import json
from pathlib import Path

from autoplan.app.cli import main
from tests.graphs import synthetic_graph


def test_search_gives_the_same_bytes_twice_but_for_times(tmp_path: Path, capsys) -> None:
    synthetic_graph(8).save(tmp_path / "graph.json")
    printed, written = [], []
    for run in range(2):
        plan = tmp_path / f"plan{run}.json"
        argv = ["search", "--model", str(tmp_path / "graph.json"), "--cluster",
                "h100-sxm:gpus=16", "--global-batch", "64", "--json", "-o", str(plan)]
        assert main(argv) == 0
        document = json.loads(capsys.readouterr().out)
        assert document["provenance"].pop("created") and document.pop("search_time_s") >= 0
        printed.append(json.dumps(document))  # the plan, its estimate, baselines, runners-up
        text = plan.read_text()
        written.append(text.replace(json.loads(text)["provenance"]["created"], "CREATED"))
    assert printed[0] == printed[1]
    assert written[0] == written[1]  # the plan file, byte for byte
