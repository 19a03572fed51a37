"""Pipeline stages of models nobody here wrote: transformers models built from tiny configs
(ModelOutput outputs, a Conv1D GPT-2 with its embedding tied to the head across stages, a
ViT that reads a sub-module of its embeddings in its forward), nanoGPT's forward(idx,
targets=None), a forward that reads attributes of units another stage owns and one that
passes a mask to every block, one with parameters outside every layer (a class token).

Gloo worlds of 2 ranks train each for 3 AdamW steps as `autoplan run --verify` does and
are compared with one process; the checks that need no processes run the chunks one after
the other in this process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from autoplan.app.run import RunOptions, load_run_plan, reference_run
from autoplan.errors import AutoplanError
from autoplan.executor import verify
from autoplan.executor.pipeline import build_chunk, input_kwargs, wrap_loss
from autoplan.models import BuiltModel, build_model
from autoplan.plan import uniform_plan
from autoplan.tracing import layer_graph_of_built
from autoplan.units import loose_parameters
from tests.executor import harness

ZOO = "tests/zoo/configs"
READER = "module:tests.executor.pipeline_models:build_submodule_reader"
MASKED = "module:tests.executor.pipeline_models:build_masked_blocks"
LOOSE = "module:tests.executor.pipeline_models:build_loose_params"
NANOGPT = "module:tests.zoo.nanogpt:build_nanogpt"
CASES = {  # case -> (model, plan shorthand)
    "hf_llama_1f1b": (f"hf:{ZOO}/llama.json", "pp=2,schedule=1f1b"),
    "hf_gpt2_tied_gpipe": (f"hf:{ZOO}/gpt2.json", "pp=2,schedule=gpipe"),
    "hf_vit_1f1b": (f"hf:{ZOO}/vit.json", "pp=2,schedule=1f1b"),
    "hf_mixtral_1f1b": (f"hf:{ZOO}/mixtral.json", "pp=2,schedule=1f1b"),
    "nanogpt_1f1b": (NANOGPT, "pp=2,schedule=1f1b"),
    "submodule_reader_gpipe": (READER, "pp=2,schedule=gpipe"),
    "masked_blocks_1f1b": (MASKED, "pp=2,schedule=1f1b"),
    "loose_params_gpipe": (LOOSE, "pp=2,schedule=gpipe"),
}
# The plan checks refuse a pipeline of a model with parameters outside every layer
# (autoplan/feasibility.py cut_refusal) while the executor runs it (each chunk holds a copy,
# their gradients summed): its plan is made without them, as a Python API user may.
UNCHECKED = {"loose_params_gpipe"}


def _options(case: str) -> RunOptions:
    model, text = CASES[case]
    return RunOptions(model=model, plan=text, nproc=2, steps=harness.STEPS,
                      global_batch=harness.GLOBAL_BATCH, seed=harness.SEED, lr=harness.LR)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[harness.WorldResult, dict]:
    plans = {case: load_run_plan(_options(case), 2)[0] for case in CASES
             if case not in UNCHECKED}
    for case in UNCHECKED:
        graph = layer_graph_of_built(build_model(CASES[case][0]))
        plans[case] = uniform_plan(CASES[case][1], graph, 2, harness.GLOBAL_BATCH)
    extra = {case: {"kind": "run", "model": CASES[case][0]} for case in CASES}
    folder = tmp_path_factory.mktemp("pipeline_real")
    return harness.run_world(2, plans, folder, extra=extra), plans


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_stages_match_one_process(world, case: str) -> None:
    result, plans = world
    assert plans[case].pp == 2
    ref = reference_run(_options(case), plans[case])
    run = verify.Trace(result.losses[case], result.params[case], result.grads[case])
    assert verify.compare(run, ref, harness.LR).problems == []


# ------------------------------------------------------------------ without processes


def _built(spec: str) -> tuple[BuiltModel, list[str], dict[str, str]]:
    """The model on cpu, its units in execution order and why a stage cannot start at
    each (the tracer's cut_refusal)."""
    torch.manual_seed(harness.SEED)
    built = build_model(spec, device="cpu")
    nodes = [n for n in layer_graph_of_built(built).nodes if n.name != "loss"]
    return built, [n.name for n in nodes], {n.name: n.cut_refusal for n in nodes}


def _run_two_chunks(model: nn.Module, units: list[str], cut: int, kwargs: dict) -> object:
    """The model's output computed by chunks units[:cut] and units[cut:], one after the
    other, as the loss sees it."""
    first = build_chunk(model, units, units[:cut])
    last = build_chunk(model, units, units[cut:])
    sent = first(**kwargs)
    assert isinstance(sent, torch.Tensor)
    received = sent.detach().requires_grad_()
    return wrap_loss(lambda output, _targets: output, last)(last(received, **kwargs), None)


@pytest.mark.parametrize("spec", [f"hf:{ZOO}/llama.json", f"hf:{ZOO}/gpt2.json",
                                  f"hf:{ZOO}/vit.json", NANOGPT, READER, MASKED, LOOSE])
def test_chunks_one_after_the_other_give_the_models_output(spec: str) -> None:
    built, units, refusals = _built(spec)
    model = built.module.eval()
    inputs = built.example_inputs(2)
    whole = model(*inputs)
    kwargs = input_kwargs(inputs)
    cuts = [k for k in range(1, len(units)) if not refusals[units[k]]]
    assert cuts, "the tracer allows no cut"
    for cut in cuts:
        out = _run_two_chunks(model, units, cut, kwargs)
        assert type(out) is type(whole), units[cut]
        got, want = tree_leaves(out), tree_leaves(whole)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert (a is None) == (b is None)


def test_a_chunk_holds_only_its_units_parameters() -> None:
    built, units, _ = _built(READER)
    model = built.module
    chunk = build_chunk(model, units, units[2:])  # blocks.1 ... head; embed is a shell
    owned = tuple(f"{u}." for u in units[2:])
    names = [n for n, _ in chunk.named_parameters(remove_duplicate=False)]
    assert names and all(n.startswith(owned) for n in names)
    assert all(k.startswith(owned) for k in chunk.state_dict())
    # the shell keeps what a forward may read, on the meta device (no memory)
    weight = chunk.get_submodule("embed.proj").weight
    assert weight.device.type == "meta" and weight.dtype == torch.float32
    assert not isinstance(weight, nn.Parameter)
    assert model.embed.proj.weight.device.type == "cpu"  # the model is left as it was


def test_every_chunk_holds_the_parameters_outside_every_layer() -> None:
    built, units, _ = _built(LOOSE)
    assert loose_parameters(built.module, units) == ["cls_token", "pos_embed", "scale"]
    for owned in (units[:2], units[2:]):
        names = {n for n, _ in build_chunk(built.module, units, owned).named_parameters()}
        assert {"cls_token", "pos_embed", "scale"} <= names


def test_the_loss_gets_the_output_as_the_model_returns_it() -> None:
    built, units, _ = _built(NANOGPT)
    model = built.module.eval()
    inputs = built.example_inputs(2)
    out = _run_two_chunks(model, units, units.index("transformer.h.1"), input_kwargs(inputs))
    assert isinstance(out, tuple) and out[1] is None  # nanoGPT's (logits, None)
    torch.testing.assert_close(out[0], model(*inputs)[0])


class _KeywordModel(nn.Module):
    """forward(*, x, scale): keyword inputs only, and blocks given the activation by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, *, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(input=h) * scale
        return h


def test_keyword_inputs_reach_every_chunk_and_the_activation_may_be_a_keyword() -> None:
    torch.manual_seed(0)
    model = _KeywordModel()
    inputs = {"x": torch.randn(3, 4), "scale": torch.rand(3, 8)}
    units = ["stem", "blocks.0", "blocks.1"]
    for cut in (1, 2):
        out = _run_two_chunks(model, units, cut, input_kwargs(inputs))
        torch.testing.assert_close(out, model(**inputs))


def test_input_kwargs_refuse_a_reserved_keyword() -> None:
    with pytest.raises(AutoplanError, match="autoplan_input0.*reserves"):
        input_kwargs({"autoplan_input0": torch.zeros(1)})


@pytest.mark.parametrize("spec, cut, reason", [
    # GPT-2's position embedding takes position ids, not the activation
    (f"hf:{ZOO}/gpt2.json", "transformer.wpe", "first input is not computed by the layers"),
    # BART's decoder blocks take the encoder's output besides the activation
    (f"hf:{ZOO}/bart.json", "model.decoder.layers.0",
     "takes an input computed by layer model.encoder.layers.1, which another pipeline stage"),
])
def test_a_cut_the_executor_cannot_run_is_refused_in_one_line(spec: str, cut: str,
                                                              reason: str) -> None:
    built, units, _ = _built(spec)
    with pytest.raises(AutoplanError, match=reason):
        _run_two_chunks(built.module.eval(), units, units.index(cut),
                        input_kwargs(built.example_inputs(2)))
