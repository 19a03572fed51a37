"""`autoplan run --dry-run` (issue 20): one process plays a rank of the plan's whole world
under torch's fake process group with the executor's own code."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autoplan.app.cli import main
from autoplan.app.dry_run import dry_run, dry_run_lines
from autoplan.app.run import RunOptions, run_plan
from autoplan.models import build_model
from tests.zoo import ZOO

STATE = ("params", "grads", "optimizer")


@pytest.mark.parametrize("plan", ["dp=2,tp=2,zero=3,micro_batch=1",
                                  "tp=2,pp=2,sequence_parallel=true,micro_batch=1"])
def test_a_played_rank_holds_what_that_rank_of_a_real_run_holds(plan: str) -> None:
    """The second plan sends sequence slices across the pipeline boundary, whose shapes a
    played stage is given (pipeline.stage_shapes) where a real one exchanges them."""
    options = RunOptions(model="gpt-small-test", plan=plan, nproc=4, steps=1, global_batch=4,
                         warmup=0)
    real = run_plan(options).ranks
    played = dry_run(options, "3").ranks
    assert [m.rank for m in played] == [3]
    assert {k: getattr(played[0], k) for k in STATE} == {k: real[3][k] for k in STATE}


def test_fake_tensors_weigh_what_real_ones_do_through_a_pipeline_step() -> None:
    """On the last stage of a large vocabulary, where the peak is the loss's backward over
    logits gathered from the TP ranks: a fake tensor's wait on a collective gives a storage
    of its own where a real one gives the collective's (LiveBytes counts it once)."""
    options = RunOptions(model="gpt:layers=2,hidden=128,heads=4,seq=256,vocab=8192",
                         plan="dp=2,tp=2,pp=2,zero=3,micro_batch=1", global_batch=4)
    fake, real = (dry_run(options, "4", tensors=kind).ranks[0] for kind in ("fake", "real"))
    assert fake.stage == real.stage == 1
    assert (fake.params, fake.grads, fake.optimizer, fake.peak) == \
        (real.params, real.grads, real.optimizer, real.peak)
    logits = 256 * 8192 * 4  # one sample's, fp32
    assert fake.peak > fake.state + 3 * logits  # logits, log-probabilities, two gradients


PEAK_MODEL = "llama:layers=4,hidden=256,heads=8,kv_heads=4,ffn=768,seq=1024,vocab=2048"
WIDE_VOCAB = "llama:layers=4,hidden=256,heads=8,kv_heads=4,ffn=768,seq=256,vocab=65536"


@pytest.mark.parametrize(("model", "plan"), [
    (PEAK_MODEL, "dp=2,tp=2,pp=2,micro_batch=4,zero=2,schedule=1f1b,sequence_parallel=true"),
    (PEAK_MODEL, "dp=2,tp=2,pp=2,micro_batch=2,zero=1,schedule=1f1b"),
    (PEAK_MODEL, "dp=2,tp=2,pp=2,micro_batch=4,zero=0,schedule=gpipe"),
    (PEAK_MODEL, "dp=2,tp=2,pp=2,micro_batch=2,zero=1,schedule=interleaved_1f1b,"
                 "virtual_stages=2"),
    (PEAK_MODEL, "dp=2,tp=2,pp=2,micro_batch=4,zero=2,schedule=interleaved_1f1b,"
                 "virtual_stages=2,sequence_parallel=true"),
    (WIDE_VOCAB, "dp=2,tp=2,pp=2,micro_batch=2,zero=1,schedule=1f1b"),
    (ZOO["llama"].spec, "dp=2,tp=2,pp=2,micro_batch=2,zero=1,schedule=interleaved_1f1b,"
                        "virtual_stages=2,sequence_parallel=true")])
def test_each_stage_peaks_within_5_percent_of_the_prediction(model: str, plan: str) -> None:
    """What torch keeps beside the activations, each case a different part: pipeline
    receive buffers for every micro-batch and the outputs in flight (the logits on the last
    stage), sequence slices across the cut, a layer's gradients reduced after every
    micro-batch (ZeRO 2), whole gradients accumulated (ZeRO 1), replicate()'s gathered
    copy (ZeRO 0), GPipe's every micro-batch in flight, a Llama block's six whole hidden
    states under TP, interleaved chunks holding unequal numbers of micro-batches (the last
    rank's loss chunk one at a time: cost_model chunks_in_flight), and where the
    embedding's gradient is most of the first stage (WIDE_VOCAB), its second copy while
    it accumulates (estimate.ONE_WEIGHT_KINDS: +28% without it); and transformers' Llama
    from its config, whose last norm is a chunk of its own after a block's: sequence
    slices cross that cut and the norm gathers them (the dry run's shapes said whole, and
    its backward failed)."""
    options = RunOptions(model=model, plan=plan, global_batch=16,
                         cluster="h100-sxm:gpus=8")
    report = dry_run(options, "all-stages")
    assert [m.stage for m in report.ranks] == [0, 1]
    for mem in report.ranks:
        assert mem.peak == pytest.approx(report.predicted(mem).peak, rel=0.05)
        assert sum(mem.at_peak.values()) == mem.peak  # the breakdown holds every byte
    told = [line for line in dry_run_lines(report) if line.startswith("  largest at the peak")]
    assert len(told) == 2  # one per played rank


def test_a_rank_of_a_256_rank_world_holds_the_predicted_state() -> None:
    """True scale: a 1.65B GPT, tp 4 x pp 2 x dp 32, both stages played. Its state bytes are
    arithmetic, so the prediction equals them (a TP rank holds its blocks' norms and
    row-parallel biases whole: LayerNode.tp_whole_params), but for AdamW's step counters
    (4 bytes per parameter tensor), which the cost model leaves out. (Under ZeRO, FSDP2
    pads each parameter's first dimension to a multiple of dp: a few hundredths of a
    percent more, which the cost model leaves out too.)"""
    options = RunOptions(model="gpt3-1.7b", plan="dp=32,tp=4,pp=2,zero=0,micro_batch=1",
                         global_batch=64, cluster="h100-sxm:gpus=256")
    report = dry_run(options, "all-stages")
    model = build_model("gpt3-1.7b").module
    assert [m.rank for m in report.ranks] == [0, 128]
    for mem in report.ranks:
        stage = report.estimate.stages[mem.stage]
        tensors = sum(len(list(model.get_submodule(name).parameters()))
                      for name in stage.layers if name != "loss")
        assert (mem.params, mem.grads) == (stage.memory.params, stage.memory.grads)
        assert mem.optimizer == stage.memory.optimizer + 4 * tensors
        assert mem.peak > mem.state


@pytest.mark.parametrize(("args", "says"), [
    (["--dry-run", "--rank", "8"], "--rank 8 is outside the plan's world of 8 ranks"),
    (["--dry-run", "--rank", "first"], "--rank must be a rank or 'all-stages'"),
    (["--rank", "1"], "--rank applies to --dry-run only"),
    (["--dry-run", "--verify"], "--verify compares values"),
])
def test_bad_dry_run_input_is_one_line_and_exit_2(capsys, args: list[str], says: str) -> None:
    code = main(["run", "--model", "gpt-tiny", "--plan", "dp=2,tp=2,pp=2", *args])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_search_check_plays_the_chosen_plan_and_says_so_beside_its_peak(capsys) -> None:
    assert main(["search", "--model", "gpt-small-test", "--cluster", "h100-sxm:gpus=4",
                 "--global-batch", "8", "--check"]) == 0
    out = capsys.readouterr().out
    assert "checked by a dry run" in out and "played in fp32" in out
    assert "fp32 prediction" in out


def test_search_check_needs_a_model_it_can_build(tmp_path, capsys) -> None:
    graph = tmp_path / "graph.json"
    assert main(["inspect", "--model", "gpt-tiny", "-o", str(tmp_path)]) == 0
    capsys.readouterr()
    code = main(["search", "--model", str(graph), "--cluster", "h100-sxm:gpus=2",
                 "--global-batch", "4", "--check"])
    err = capsys.readouterr().err
    assert code == 2 and "--check builds the model" in err and "Traceback" not in err


@pytest.mark.gpu
def test_a_rank_played_with_real_tensors_on_cuda_holds_what_the_cpu_count_says() -> None:
    """On a GPU the rank's tensors are real: its state equals the fake count on the CPU,
    and the allocator's peak is at least the counted one (it rounds blocks up)."""
    options = RunOptions(model="gpt-small-test", plan="dp=2,tp=2,pp=2,zero=3,micro_batch=1",
                         global_batch=8)
    cuda = dry_run(replace(options, device="cuda"), "4").ranks[0]
    cpu = dry_run(replace(options, device="cpu"), "4").ranks[0]
    assert (cuda.params, cuda.grads, cuda.optimizer) == (cpu.params, cpu.grads, cpu.optimizer)
    assert cuda.max_allocated is not None and cuda.max_allocated >= cuda.peak
