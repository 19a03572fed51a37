"""autoplan.executor: applies a Plan to a module with torch.distributed building blocks.

`parallelize(model, plan, loss_fn)` builds the DeviceMesh, splits the pipeline, and applies
tensor/sequence parallelism, activation checkpointing and FSDP2/replication per layer, in
that order; the Runner it returns trains the result with one `step` call for every plan.
"""

from autoplan.executor.parallelize import LossFn, Runner, parallelize, precheck

__all__ = ["LossFn", "Runner", "parallelize", "precheck"]
