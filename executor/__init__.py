"""autoplan.executor: applies a Plan to a module with torch.distributed building blocks.

`parallelize(model, plan, loss_fn)` builds the DeviceMesh, splits the pipeline, and applies
tensor/sequence parallelism, activation checkpointing and FSDP2/replication per layer, in
that order; the Runner it returns trains the result with one `step` call for every plan.
The training loop and the one-process reference that `autoplan run --verify` compares with
are here too (verify.py). This front is what the floors above import.
"""

from autoplan.executor.data_parallel import apply_fsdp, apply_replicate
from autoplan.executor.mesh import GROUP_TIMEOUT
from autoplan.executor.parallelize import LossFn, Runner, parallelize, precheck
from autoplan.executor.tensor_parallel import tp_styles
from autoplan.executor.verify import (
    Batch,
    Comparison,
    DropoutOff,
    Trace,
    batch_norm_layers,
    compare,
    criterion,
    local_bytes,
    optimizer_tensors,
    reference_trace,
    train,
)

__all__ = ["LossFn", "Runner", "parallelize", "precheck", "GROUP_TIMEOUT", "apply_fsdp",
           "apply_replicate", "tp_styles", "Batch", "Comparison", "DropoutOff", "Trace",
           "batch_norm_layers", "compare", "criterion", "local_bytes", "optimizer_tensors",
           "reference_trace", "train"]
