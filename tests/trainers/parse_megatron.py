"""Read autoplan's Megatron exports with the argument definitions Megatron-Core ships.

Runs in the trainer environment (.venv-trainers). Megatron-Core 0.16.1, the newest release
on Python 3.11, ships no argument parser (megatron/training is in its wheels from 0.17,
which need Python 3.12); Megatron-LM builds most of its arguments from the core config
dataclasses, each field a flag (ArgumentGroupFactory: `--field-name`, booleans as
store_true, or `--no-field-name` when they default to True, names from a field's
"argparse_meta"). This builds the parser the same way from TransformerConfig and
DistributedDataParallelConfig, adds the four training-loop flags Megatron-LM's
arguments.py defines itself (batch sizes, layers per virtual stage, FSDP2), parses, and
then has the core check the values: TransformerConfig and DistributedDataParallelConfig
validate on construction, ConstantNumMicroBatchesCalculator the batch arithmetic.

Reads a JSON list of cases, each {"args": [...], "world_size": N, "num_layers": L,
"hidden_size": H, "num_attention_heads": A}, from stdin; prints, per case, the values
read back or the error raised.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import sys

_TRAINING_LOOP = {  # megatron/training/arguments.py (Megatron-LM), not in megatron-core 0.16
    "--micro-batch-size": {"type": int, "default": None},
    "--global-batch-size": {"type": int, "default": None},
    "--num-layers-per-virtual-pipeline-stage": {"type": int, "default": None},
    "--use-torch-fsdp2": {"action": "store_true"},
}


def _flag_type(field: dataclasses.Field) -> type:
    text = str(field.type)
    return next((t for t in (bool, int, float) if t.__name__ in text), str)


def add_config_fields(parser: argparse.ArgumentParser, config: type, seen: set[str]) -> None:
    for field in dataclasses.fields(config):
        if field.name in seen or not field.init:
            continue
        seen.add(field.name)
        meta = field.metadata.get("argparse_meta", {})
        default = field.default if field.default is not dataclasses.MISSING else None
        default = meta.get("default", default)
        name = field.name.replace("_", "-")
        if isinstance(default, bool) or _flag_type(field) is bool:
            on = not default
            names = meta.get("arg_names") or [f"--{name}" if on else f"--no-{name}"]
            parser.add_argument(*names, dest=field.name, default=default,
                                action="store_true" if on else "store_false")
        elif isinstance(default, (int, float, str, type(None))):
            names = meta.get("arg_names") or [f"--{name}"]
            parser.add_argument(*names, dest=field.name, default=default,
                                type=_flag_type(field))


def read(case: dict) -> dict:
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.num_microbatches_calculator import ConstantNumMicroBatchesCalculator
    from megatron.core.transformer.transformer_config import TransformerConfig

    parser = argparse.ArgumentParser(prog="pretrain_gpt.py", allow_abbrev=False)
    seen: set[str] = set()
    for flag, kwargs in _TRAINING_LOOP.items():
        parser.add_argument(flag, **kwargs)
        seen.add(flag[2:].replace("-", "_"))
    add_config_fields(parser, TransformerConfig, seen)
    add_config_fields(parser, DistributedDataParallelConfig, seen)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            args = parser.parse_args(case["args"])
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        layers = case["num_layers"]
        virtual = (layers // pp // args.num_layers_per_virtual_pipeline_stage
                   if args.num_layers_per_virtual_pipeline_stage else None)
        names = {f.name for f in dataclasses.fields(TransformerConfig)}
        given = {k: v for k, v in vars(args).items() if k in names and v is not None}
        given |= {"num_layers": layers, "hidden_size": case["hidden_size"],
                  "num_attention_heads": case["num_attention_heads"],
                  "virtual_pipeline_model_parallel_size": virtual,
                  "pipeline_dtype": torch.bfloat16 if args.bf16 else torch.float32}
        config = TransformerConfig(**given)
        ddp = DistributedDataParallelConfig(
            use_distributed_optimizer=args.use_distributed_optimizer)
        dp = case["world_size"] // (tp * pp)
        batches = ConstantNumMicroBatchesCalculator(args.global_batch_size,
                                                    args.micro_batch_size, dp, False, 0)
    except (SystemExit, AssertionError, ValueError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err} {said.getvalue()[-2000:]}"}
    return {"tp": config.tensor_model_parallel_size, "pp": config.pipeline_model_parallel_size,
            "virtual": config.virtual_pipeline_model_parallel_size,
            "sequence_parallel": config.sequence_parallel,
            "recompute_granularity": config.recompute_granularity,
            "recompute_method": config.recompute_method,
            "recompute_num_layers": config.recompute_num_layers, "bf16": config.bf16,
            "fp16": config.fp16, "distributed_optimizer": ddp.use_distributed_optimizer,
            "fsdp2": args.use_torch_fsdp2, "micro_batch": batches.micro_batch_size,
            "global_batch": batches.get_current_global_batch_size(),
            "micro_batches": batches.get(), "dp": dp}


def main() -> None:
    print(json.dumps([read(case) for case in json.load(sys.stdin)]))


if __name__ == "__main__":
    main()
