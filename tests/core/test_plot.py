"""`autoplan plot`: the picture is written whole, for every schedule, and bad input is refused."""

from __future__ import annotations

import pytest

from autoplan.app.cli import main
from autoplan.graph import LayerGraph, LayerNode
from autoplan.plan import uniform_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _graph() -> LayerGraph:
    def node(name: str, kind: str) -> LayerNode:
        return LayerNode(name=name, kind=kind, module_type="Synthetic", signature=kind,
                         params=10**6, shared_params=0, param_bytes=2 * 10**6,
                         fwd_flops=1e12, bwd_flops=2e12, act_bytes=10**5, act_bytes_fixed=0,
                         input_bytes=100, output_bytes=100, output_shape=(1, 8, 8),
                         fwd_io_bytes=1000, bwd_io_bytes=2000)
    return LayerGraph("synthetic", "bfloat16", "flash", 8, (
        node("embed", "embedding"), *(node(f"layers.{i}", "block") for i in range(8)),
        node("head", "head")), ())


@pytest.mark.parametrize("shorthand,batch", [("pp=1,ckpt=selective", 16),
                                             ("pp=4,schedule=1f1b,ckpt=full", 32),
                                             ("pp=4,schedule=gpipe", 32),
                                             ("pp=2,virtual_stages=2,zero=1", 32),
                                             ("pp=4", 256)])  # 128 micro-batches: 2 windows
def test_plot_writes_a_png(tmp_path, capsys, shorthand: str, batch: int) -> None:
    graph = _graph()
    graph.save(tmp_path / "graph.json")
    uniform_plan(shorthand, graph, 8, batch, "h100-sxm:gpus=8").save(tmp_path / "plan.json")
    out = tmp_path / "pictures" / "plan.png"
    assert main(["plot", str(tmp_path / "plan.json"), "-o", str(out),
                 "--model", str(tmp_path / "graph.json")]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["plan.png"]  # no temporary left
    assert f"wrote {out}: simulated pipeline" in capsys.readouterr().out


def test_plot_needs_a_cluster_and_a_plan_file(tmp_path, capsys) -> None:
    graph = _graph()
    graph.save(tmp_path / "graph.json")
    uniform_plan("pp=2", graph, 8, 16).save(tmp_path / "plan.json")  # no cluster recorded
    args = ["plot", str(tmp_path / "plan.json"), "-o", str(tmp_path / "p.png"), "--model",
            str(tmp_path / "graph.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("records no cluster; give --cluster") and len(err.splitlines()) == 1
    assert main([*args, "--cluster", "a100-80g:gpus=8"]) == 0
    assert main(["plot", "pp=2", "-o", str(tmp_path / "q.png")]) == 2
    assert "plan file 'pp=2' does not exist" in capsys.readouterr().err
