"""Read autoplan's torchtitan exports with torchtitan's own ConfigManager and ParallelDims.

Runs in the trainer environment (.venv-trainers). Reads a JSON list of cases, each
{"module": ..., "config": ..., "args": [overrides], "world_size": N}, from stdin; prints,
per case, the config fields torchtitan read back or the error it raised.
"""

import contextlib
import io
import json
import sys


def read(case: dict) -> dict:
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import ParallelDims

    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            config = ConfigManager().parse_args(
                ["--module", case["module"], "--config", case["config"], *case["args"]])
            dims = ParallelDims.from_config(config.parallelism, case["world_size"])
    except (SystemExit, AssertionError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {err} {said.getvalue()[-2000:]}"}
    p, t, ac = config.parallelism, config.training, config.activation_checkpoint
    return {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp,
            "pp": dims.pp, "sequence_parallel": p.enable_sequence_parallel,
            "reshard": p.fsdp_reshard_after_forward, "schedule": p.pipeline_parallel_schedule,
            "pipeline_micro_batch": p.pipeline_parallel_microbatch_size,
            "fqns": p.module_fqns_per_model_part, "local_batch": t.local_batch_size,
            "global_batch": t.global_batch_size, "param_dtype": t.mixed_precision_param,
            "checkpoint": "none" if ac is None else type(ac).__qualname__}


def main() -> None:
    print(json.dumps([read(case) for case in json.load(sys.stdin)]))


if __name__ == "__main__":
    main()
