"""Per-rank memory of one pipeline stage, by component.

Conventions (../shared/HARDWARE.md; Rajbhandari et al. 2020, ZeRO, sec. 3.1): weights and
gradients in the training dtype, optimizer state as cost_model/analytic.py's
OPTIMIZER_STATE_BYTES_PER_PARAM (12 bytes for mixed-precision AdamW: 16 in all with bf16
weight and gradient). ZeRO 1 shards optimizer state over dp, 2 also gradients, 3 also weights.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from autoplan.cost_model.analytic import TP_SHARDED_KINDS
from autoplan.cost_model.pipeline import most_held
from autoplan.graph import LayerNode
from autoplan.plan import LayerStrategy

__all__ = ["StageMemory", "LayerCost", "KORTHIKANTI_REPLICATED_TENSORS",
           "TORCH_SP_GATHERED_TENSORS", "saved_bytes_per_sample", "saved_bytes_at",
           "layer_state_bytes", "unsharded_grad_bytes", "loss_backward_bytes", "receive_bytes",
           "receive_share",
           "ChunkMessage", "chunk_messages", "stage_pipeline_bytes", "sequence_sliced",
           "stage_memory", "counted_stage_memory", "stage_tail"]

KORTHIKANTI_REPLICATED_TENSORS = 5
"""Hidden-state tensors of a transformer block's saved activations that stay whole on every
TP rank without sequence parallelism, for a graph traced before LayerNode.tp_whole_act_bytes
was recorded: Korthikanti et al. 2022, eq. 2 counts 10sbh bytes of 34sbh + 5as^2b outside
the sharded regions (norm inputs, dropout masks), five tensors of sbh two-byte elements."""

TORCH_SP_GATHERED_TENSORS = 2
"""Hidden-state tensors of a transformer block's saved activations that stay whole on every
TP rank with sequence parallelism as torch runs it: ColwiseParallel saves the all-gathered
input of each column-parallel group (attention q/k/v, MLP fc) for its weight gradient, where
Megatron-LM saves the sequence slice and gathers it again in backward (Korthikanti et al.
2022, sec. 4.2.2). Measured: tests/cost_model/test_memory_vs_executor.py."""

PREFETCHED_LAYERS = 2
"""FSDP holds the gathered weights of the running layer and the one it prefetches (torch
FSDP2 fully_shard: forward and backward prefetch of one layer)."""


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one rank of a stage at its peak."""

    params: float
    grads: float
    optimizer: float
    activations: float
    """Saved for backward: micro-batches in flight x what each layer keeps."""
    transient: float
    """What one layer's backward adds, at the layer where it adds most: its recomputed
    activations (checkpointing) and its gradients being reduced (ZeRO 2-3), less what its
    micro-batch has freed by then (the saved bytes of the layers after it in its chunk,
    whose backward ran first); never below 0."""
    buffers: float
    """Gathered FSDP weights (ZeRO 3: the prefetched layers; ZeRO 0-2: every layer's, kept
    all step) and whole gradients accumulated over the micro-batches (ZeRO 0-1)."""
    workspace: float = 0.0
    """The loss's gradients during its backward (LayerCost.workspace_bytes)."""
    pipeline: float = 0.0
    """What torch's pipeline stages keep: receive buffers for every micro-batch and the
    outputs of those in flight (chunk_messages)."""

    @property
    def peak(self) -> float:
        return (self.params + self.grads + self.optimizer + self.activations + self.transient
                + self.buffers + self.workspace + self.pipeline)

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"peak": self.peak}


@dataclass(frozen=True)
class LayerCost:
    """One layer under one strategy on one rank: its time per micro-batch and per step, and
    its memory, apart from neighbours and schedule (CostModel.layer_cost)."""

    per_micro_batch_s: dict[str, float]
    tail_s: dict[str, float]
    """Once per step: exposed gradient sync and weight gather, the optimizer step."""
    state_bytes: float
    """Weights, gradients and optimizer state."""
    state_parts: tuple[float, float, float]
    saved_bytes: float
    """Saved for backward per micro-batch in flight."""
    fixed_bytes: float
    transient_bytes: float
    """Recomputed activations live during a checkpointed layer's backward."""
    gathered_bytes: float
    """Whole weights FSDP gathers for this layer (ZeRO 3)."""
    reduce_bytes: float
    """Whole gradients of this layer live during its backward beside those kept: while
    FSDP2 reduces them (ZeRO 2 and 3, dp > 1), the autograd result and the flat copy the
    reduce-scatter reads (torch foreach_reduce); where they accumulate (ZeRO 0-1 or no
    data parallelism), an embedding's or head's new gradient beside the one kept
    (estimate.ONE_WEIGHT_KINDS). One layer at a time (counted_stage_memory)."""
    kept_bytes: float = 0.0
    """Whole weights FSDP keeps gathered all step (ZeRO 0-2, dp > 1: FSDP2's copy beside
    the shard, replicate()'s too) and whole gradients accumulated over the micro-batches
    beyond the shard kept after the step (ZeRO 0-1): held at the stage's peak, so also
    counted in state_bytes."""
    workspace_bytes: float = 0.0
    """The loss's gradients during its backward (loss_backward_bytes), once per stage:
    added to the peak, not taken as the larger beside a recomputation (the last stage's
    peak is at the loss's backward), so the search's budgets hold it exactly."""

    micro_batch_s: float = field(init=False, repr=False, compare=False)
    """The sum of per_micro_batch_s (taken once: the search reads it for every plan)."""
    step_tail_s: float = field(init=False, repr=False, compare=False)
    """The sum of tail_s."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "micro_batch_s", sum(self.per_micro_batch_s.values()))
        object.__setattr__(self, "step_tail_s", sum(self.tail_s.values()))

    @property
    def prefetch_bytes(self) -> float:
        """FSDP's gathered copies of this layer's weights in flight: its own and the next
        layer's prefetch (PREFETCHED_LAYERS)."""
        return PREFETCHED_LAYERS * self.gathered_bytes

    @property
    def peak_extra_bytes(self) -> float:
        """The most this layer adds to a stage's peak through the terms a stage takes the
        largest of, not the sum (transient and reduce less what is freed by then, prefetch:
        counted_stage_memory): the search's per-layer budget counts this on top of the
        sums."""
        return self.transient_bytes + self.prefetch_bytes + self.reduce_bytes


def stage_tail(costs: list[LayerCost]) -> dict[str, float]:
    tail = {"dp_comm": 0.0, "optimizer": 0.0}
    for cost in costs:
        for part, seconds in cost.tail_s.items():
            tail[part] += seconds
    return tail


def stage_memory(chunks: Sequence[Sequence[LayerCost]], in_flight: Sequence[tuple[int, ...]],
                 receive: float = 0.0, outputs: Sequence[float] = ()) -> StageMemory:
    """A stage's memory from the costs of the layers of each of its chunks (in order), at
    the point of its schedule where its chunks hold the micro-batches in flight of one
    vector of `in_flight` (pipeline.chunks_in_flight: the one holding the most): what adds
    up, plus what one layer's backward adds at most (StageMemory.transient: one layer runs
    its backward at a time) and the buffers. `receive`: the bytes the pipeline stage keeps
    all step, `outputs[c]`: chunk c's output kept per micro-batch in flight
    (StageMemory.pipeline; stage_pipeline_bytes)."""
    return counted_stage_memory([[(cost, 1) for cost in chunk] for chunk in chunks], in_flight,
                                receive, outputs)


def counted_stage_memory(chunks: Sequence[Sequence[tuple[LayerCost, int]]],
                         in_flight: Sequence[tuple[int, ...]], receive: float = 0.0,
                         outputs: Sequence[float] = ()) -> StageMemory:
    """stage_memory of a stage whose chunk c holds runs of `count` consecutive layers of
    each (cost, count) of chunks[c], in order: the search checks many plans whose stages
    repeat a few kinds of layer."""
    # one pass, each sum in layer order (as sum() adds them)
    params = grads = optimizer = fixed = kept = workspace = 0
    prefetch = transient = 0.0
    saved = [0.0] * len(chunks)
    for c, counted in enumerate(chunks):
        for cost, n in counted:
            if n <= 0:
                continue
            weights, gradients, states = cost.state_parts
            params += n * weights
            grads += n * gradients
            optimizer += n * states
            saved[c] += n * cost.saved_bytes
            fixed += n * cost.fixed_bytes
            kept += n * cost.kept_bytes
            workspace += n * cost.workspace_bytes
            prefetch = max(prefetch, cost.prefetch_bytes)
        freed = 0.0  # by a layer's backward: its micro-batch's saved bytes after it
        for cost, n in reversed(counted):
            if n > 0:
                transient = max(transient, cost.transient_bytes + cost.reduce_bytes - freed)
                freed += n * cost.saved_bytes
    outputs = list(outputs) or [0.0] * len(chunks)
    held = most_held(in_flight, list(map(operator.add, saved, outputs)))
    return StageMemory(params=params, grads=grads, optimizer=optimizer,
                       activations=sum(n * s for n, s in zip(held, saved, strict=True)) + fixed,
                       transient=transient, buffers=prefetch + kept,
                       workspace=workspace,
                       pipeline=receive + sum(n * o for n, o in zip(held, outputs, strict=True)))


def _sharded(node: LayerNode) -> bool:
    return node.kind in TP_SHARDED_KINDS


def saved_bytes_per_sample(node: LayerNode, layer: LayerStrategy) -> float:
    """Bytes `node` keeps per sample on one rank until its backward, under `layer`'s plan.

    Full checkpointing keeps the input (sequence-sharded with SP, Korthikanti et al. 2022
    sec. 5); selective drops the S x S tensors (LayerNode.attn_act_bytes). Under TP a block
    divides by tp but what it saves whole (_whole_act_bytes); an embedding or head splits its
    weight only: it saves its whole input (token ids; the gathered hidden state that a
    column-parallel head multiplies).
    """
    return saved_bytes_at(node, layer.tp, layer.sequence_parallel, layer.checkpoint)


def saved_bytes_at(node: LayerNode, tp: int, sp: bool, checkpoint: str) -> float:
    """saved_bytes_per_sample of `node` at these fields of a strategy: the cost model asks
    it under another checkpointing than the strategy's, without copying the strategy."""
    if checkpoint == "full":
        return node.input_bytes / (tp if sp and _sharded(node) else 1)
    act = node.act_bytes - (node.attn_act_bytes if checkpoint == "selective" else 0)
    if node.kind == "block":
        whole = min(act, _whole_act_bytes(node, sp))
        return whole + (act - whole) / tp
    return act / tp if sp and node.kind == "norm" else act


def _whole_act_bytes(node: LayerNode, sp: bool) -> float:
    """Bytes per sample a block saves whole on every TP rank: as traced (LayerNode.
    tp_whole_act_bytes; with sequence parallelism the gathered inputs of column-parallel
    Linears only), else KORTHIKANTI_REPLICATED_TENSORS or TORCH_SP_GATHERED_TENSORS hidden
    states."""
    traced = node.tp_gathered_act_bytes if sp else node.tp_whole_act_bytes
    if traced is not None:
        return traced
    return (TORCH_SP_GATHERED_TENSORS if sp else KORTHIKANTI_REPLICATED_TENSORS) \
        * node.output_bytes


def loss_backward_bytes(node: LayerNode) -> float:
    """Bytes per sample that the loss's backward holds on top of what it saved: the
    gradient of each saved tensor and of its input, live together (cross entropy: the
    gradients of the log-probabilities and of the logits, each as large as the logits;
    measured op by op with `autoplan run --dry-run`: nll_loss_backward and
    _log_softmax_backward_data outputs at the last stage's peak). 0 for any other layer."""
    return float(node.act_bytes + node.input_bytes) if node.kind == "loss" else 0.0


def layer_state_bytes(node: LayerNode, layer: LayerStrategy, elt_bytes: int, optimizer_bytes: int,
                      shared: bool) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes of `node` on one rank after a step.

    `shared`: also hold the tied weights an earlier unit owns (it sits on another stage, as
    Megatron keeps a copy of the embedding on the last stage). Without data parallelism a
    gradient stays as autograd made it (unsharded_grad_bytes)."""
    per_rank = _tp_share(node, layer.tp, shared, node.tp_whole_params)
    shards = layer.dp if layer.zero >= 1 else 1  # FSDP2 shards all three (module docstring)
    grads = per_rank * elt_bytes / shards if layer.dp > 1 else \
        unsharded_grad_bytes(node, layer, elt_bytes, shared)
    return per_rank * elt_bytes / shards, grads, per_rank * optimizer_bytes / shards


def unsharded_grad_bytes(node: LayerNode, layer: LayerStrategy, elt_bytes: int,
                         shared: bool) -> float:
    """Bytes of `node`'s gradients on one rank as backward makes them, before data
    parallelism reduces them: its TP share, but whole for the weights whose gradient torch
    makes whole (LayerNode.tp_whole_grad_params: a vocabulary-split embedding)."""
    return _tp_share(node, layer.tp, shared,
                     node.tp_whole_params + node.tp_whole_grad_params) * elt_bytes


def _tp_share(node: LayerNode, tp: int, shared: bool, whole: int) -> float:
    """Parameters of `node` on one TP rank, `whole` of them on every rank (norms,
    row-parallel biases: LayerNode.tp_whole_params)."""
    params = node.params + (node.shared_params if shared else 0)
    whole = min(whole, params)
    return (params - whole) / tp + whole if _sharded(node) else params


def receive_bytes(sent: LayerNode, layer: LayerStrategy, micro_batch_size: int,
                  sliced: bool) -> float:
    """Bytes of one receive buffer at a pipeline cut after `sent`, on a rank of the layer
    beside the cut under `layer`: `sent`'s output for one micro-batch, a sequence slice of
    it under sequence parallelism where the layers on both sides take slices (`sliced`:
    sequence_sliced). torch's PipelineStage keeps one per micro-batch of the step for each
    input it receives and each output gradient (stage.py, _setup_forward_recv_info and
    _create_grad_recv_info), from the first step on."""
    return receive_share(layer, micro_batch_size, sliced) * sent.output_bytes


def receive_share(layer: LayerStrategy, micro_batch_size: int, sliced: bool) -> float:
    """receive_bytes per byte per sample of the message: the samples of a rank's
    micro-batch, over tp under sequence parallelism where the message is `sliced`."""
    samples = micro_batch_size // layer.dp
    return samples / layer.tp if sliced and layer.sequence_parallel else samples


def sequence_sliced(before: LayerNode, after: LayerNode | None) -> bool:
    """Whether a pipeline cut between `before` and `after` (None: the model's end) moves
    sequence slices when the layers run sequence parallelism: where `before` gives them, a
    block (the executor slices units of split Linears and norms, never a head, an embedding
    or a unit of norms alone: executor/tensor_parallel._splits_sequence), whatever `after`
    takes (a unit that takes the whole sequence gathers it after the cut:
    executor/pipeline.stage_shapes)."""
    return before.kind == "block" and after is not None


@dataclass(frozen=True)
class ChunkMessage:
    """One pipeline message a chunk's rank keeps copies of (chunk_messages)."""

    layer: int
    """The layer beside the cut whose strategy sizes the copies (receive_share)."""
    sent: int
    """The layer whose output the message is."""
    sliced: bool
    """Moved as sequence slices under sequence parallelism (sequence_sliced)."""
    per_step: bool
    """One copy for every micro-batch of the step (a receive buffer), else one for each
    micro-batch in flight (the output torch keeps until that micro-batch's backward)."""
    at_end: bool
    """At the chunk's end, so changed by where the chunk ends."""


def chunk_messages(nodes: Sequence[LayerNode], first: int, last: int) -> list[ChunkMessage]:
    """What torch's PipelineStage keeps for the chunk holding layers [first, last): the
    input's receive buffer for every micro-batch unless it starts the model (stage.py,
    _setup_forward_recv_info); what it returns, for each micro-batch in flight until that
    micro-batch's backward (its fwd_cache: the last chunk returns the model's output, the
    logits); and unless it ends the model, the receive buffer of that output's gradient for
    every micro-batch (_create_grad_recv_info)."""
    out: list[ChunkMessage] = []
    if last <= first:
        return out
    if first > 0:
        out.append(ChunkMessage(first, first - 1, sequence_sliced(nodes[first - 1], nodes[first]),
                                per_step=True, at_end=False))
    i = last - 1 if nodes[last - 1].kind != "loss" else last - 2
    if i >= first:
        after = nodes[last] if last < len(nodes) else None
        sliced = sequence_sliced(nodes[i], after)
        out.append(ChunkMessage(i, i, sliced, per_step=False, at_end=True))
        if after is not None:
            out.append(ChunkMessage(i, i, sliced, per_step=True, at_end=True))
    return out


def stage_pipeline_bytes(nodes: Sequence[LayerNode], strategies: Sequence[LayerStrategy],
                         chunks: Sequence[tuple[int, int]], micro_batch_size: int,
                         micro_batches: int,
                         messages: Sequence[list[ChunkMessage]] | None = None
                         ) -> tuple[float, list[float]]:
    """StageMemory.pipeline of a stage holding chunks [first, last) of a pipeline, as the
    bytes kept all step (each receive buffer for every micro-batch) and, per chunk, those
    kept per micro-batch in flight (its output: chunk_messages). `messages`: each chunk's
    chunk_messages, where the caller keeps them (the search prices many plans of the same
    chunks)."""
    receive, outputs = 0.0, []
    if messages is None:
        messages = [chunk_messages(nodes, first, last) for first, last in chunks]
    for kept in messages:
        outputs.append(0.0)
        for m in kept:
            nbytes = receive_bytes(nodes[m.sent], strategies[m.layer], micro_batch_size,
                                   m.sliced)
            if m.per_step:
                receive += micro_batches * nbytes
            else:
                outputs[-1] += nbytes
    return receive, outputs
