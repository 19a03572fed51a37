"""Read autoplan's DeepSpeed exports with DeepSpeed's own DeepSpeedConfig.

Runs in the trainer environment (.venv-trainers). Reads a JSON list of cases, each
{"config": {...}, "dp": N}, from stdin; prints, per case, what DeepSpeed read back or the
error it raised. DeepSpeed takes the data-parallel size from an `mpu` (the Megatron-style
object it documents for model parallelism) when there is tensor parallelism, so each case
gets one answering the plan's dp.
"""

import json
import os
import sys


class _Mpu:
    def __init__(self, dp: int) -> None:
        self.dp = dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp


def read(case: dict) -> dict:
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        config = DeepSpeedConfig(case["config"], mpu=_Mpu(case["dp"]))
    except Exception as err:  # noqa: BLE001 - what DeepSpeed refused, reported to the test
        return {"error": f"{type(err).__name__}: {err}"}
    tp = config.tensor_parallel_config
    return {"train_batch_size": config.train_batch_size,
            "micro_batch_per_gpu": config.train_micro_batch_size_per_gpu,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "zero_stage": int(config.zero_optimization_stage),
            "bf16": config.bfloat16_config.enabled,
            "fp16": config.float16_config.enabled, "autotp_size": tp.autotp_size,
            "world_size": config.world_size}


def main() -> None:
    import deepspeed
    import deepspeed.comm.torch

    # its CPU backend JIT-compiles a shared-memory all-reduce (about 50 s) that a config
    # never uses: skipped here, the backend answers rank and world size without it
    deepspeed.comm.torch.build_shm_op = lambda: None
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeedConfig asks the rank
    try:
        print(json.dumps([read(case) for case in json.load(sys.stdin)]))
    finally:
        deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    main()
