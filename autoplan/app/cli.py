"""The `autoplan` command line: argument parsing, tables and exit codes live only here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoplan import __version__
from autoplan.errors import AutoplanError, WorkerFailed

if TYPE_CHECKING:
    from autoplan.app.run import RunOptions
    from autoplan.inspection import InspectResult

__all__ = ["main"]

_DTYPES = ("bf16", "fp16", "fp32")  # autoplan.models.DTYPES, without importing torch here
_TRAINERS = ("torchtitan", "megatron", "deepspeed")
"""autoplan.trainers.TRAINERS, without importing it here: it loads the Plan model (pydantic),
0.2 s on every start of the CLI."""
# Commands of the product that later work fills in; each says so instead of pretending.
_NOT_BUILT: dict[str, str] = {}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoplan", description="Plan and apply hybrid parallel training "
                     "for any PyTorch model.")
    parser.add_argument("--version", action="version", version=f"autoplan {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    models = sub.add_parser("models", help="list the model presets")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(handler=_cmd_models)

    inspect = sub.add_parser("inspect", help="show a model's layer graph: parameters, FLOPs, "
                             "activation bytes per layer")
    inspect.add_argument("--model", required=True, help="model spec or preset name")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--dtype", choices=_DTYPES, default="bf16",
                         help="training dtype of parameters and activations (default bf16)")
    inspect.add_argument("--attention", choices=("flash", "math"), default="flash",
                         help="trace attention as the fused GPU kernel or the math path")
    inspect.add_argument("--all", action="store_true", help="one row per layer, no grouping")
    inspect.add_argument("--plan", help="also check a plan (JSON file or dp=..,tp=..,pp=..)")
    inspect.add_argument("--world-size", type=int, help="devices, for a shorthand --plan")
    inspect.add_argument("--global-batch", type=int, help="samples per step, for --plan")
    inspect.add_argument("-o", "--output", help="write graph.json (and plan.json) to this folder")
    _add_cache_argument(inspect)
    inspect.set_defaults(handler=_cmd_inspect)

    profile = sub.add_parser("profile", help="measure per-layer compute, memory and "
                             "collective bandwidth, or derive them from a hardware preset")
    profile.add_argument("--model", required=True, help="model spec or preset name")
    profile.add_argument("--mode", choices=("measure", "analytic"), default="measure")
    profile.add_argument("--cluster", help="cluster spec (analytic: the target; measure: "
                         "default local-cpu:procs=NPROC)")
    profile.add_argument("--nproc", type=int, default=2,
                         help="local processes for collective timing (measure)")
    profile.add_argument("--micro-batches", default="1,2,4,8", help="e.g. 1,2,4,8")
    profile.add_argument("--tp", default="1,2,4,8", help="TP degrees whose shard shapes to time")
    profile.add_argument("--repeats", type=int, default=10,
                         help="timed runs per point (default 10); --in-situ: the most timed "
                         "passes per point, in samples of 4, 3 samples at least")
    profile.add_argument("--warmup", type=int, default=3)
    profile.add_argument("--threads", type=int, help="torch threads while timing layers")
    profile.add_argument("--dtype", choices=_DTYPES,
                         help="default: bf16 for GPUs (analytic, --device cuda), fp32 on a CPU")
    profile.add_argument("--device", default="cpu", help="cpu or cuda")
    profile.add_argument("--comm-sizes", help="message bytes, e.g. 1024,1048576 "
                         "(default: the powers of 2 from 1 KiB to 128 MiB around the sizes "
                         "this model's plans send)")
    profile.add_argument("--collectives", help="collectives to time, e.g. all_reduce,all_to_all "
                         "(default: those the cost model prices: all_reduce, all_gather, "
                         "reduce_scatter, send_recv)")
    profile.add_argument("--no-comm", action="store_true", help="skip collective timing")
    profile.add_argument("--in-situ", action="store_true",
                         help="time layers in --nproc local ranks at once, as a local run "
                         "shares the cores; tp > 1 as DTensors with their collectives")
    profile.add_argument("-o", "--output", required=True, help="folder for profile.json, "
                         "layers.csv, comm.csv")
    profile.set_defaults(handler=_cmd_profile)

    estimate = sub.add_parser("estimate", help="predict step time and per-rank memory of a "
                              "plan, with a breakdown")
    estimate.add_argument("--model", required=True,
                          help="model spec or preset, or a graph.json from `inspect -o`")
    estimate.add_argument("--cluster", required=True, help="e.g. h100-sxm:nodes=16, "
                          "a100-80g:gpus=64, or a profile/cluster .json")
    estimate.add_argument("--global-batch", type=int, required=True, help="samples per step")
    estimate.add_argument("--plan", required=True,
                          help='plan.json, or "dp=..,tp=..,pp=..,micro_batch=..,ckpt=full,'
                          'zero=1,schedule=1f1b"')
    estimate.add_argument("--seq", type=int, help="sequence length (overrides the model's)")
    _add_pricing_arguments(estimate)
    estimate.add_argument("--json", action="store_true", help="print JSON")
    _add_cache_argument(estimate)
    estimate.set_defaults(handler=_cmd_estimate)

    search = sub.add_parser("search", help="find the fastest plan that fits memory (ILP, DP)")
    search.add_argument("--model", required=True,
                        help="model spec or preset, or a graph.json from `inspect -o`")
    search.add_argument("--cluster", required=True, help="e.g. h100-sxm:nodes=16")
    search.add_argument("--global-batch", type=int, required=True, help="samples per step")
    search.add_argument("--seq", type=int, help="sequence length (overrides the model's)")
    search.add_argument("--profile", help="profile folder or profile.json")
    search.add_argument("--solver", choices=("auto", "ilp", "dp"), default="auto",
                        help="stage solver: the ILP (HiGHS), the exact Pareto DP, or auto: "
                        "the DP on stages of up to 16 layers or of 32 runs or more, the ILP "
                        "on the others (all exact)")
    search.add_argument("--top-k", type=int, default=3, help="runners-up to show")
    search.add_argument("--memory-limit", type=float, help="GiB per device")
    search.add_argument("--max-tp", type=int, help="largest TP degree (default: a node)")
    search.add_argument("--fix", help="fix fields, e.g. pp=8,zero=1,ckpt=full,schedule=1f1b")
    search.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved_1f1b"),
                        help="pipeline schedule (the same as --fix schedule=...)")
    search.add_argument("--dtype", choices=_DTYPES, default="bf16")
    search.add_argument("--attention", choices=("flash", "math"), default="flash")
    search.add_argument("--time-limit", type=float, default=30.0,
                        help="seconds per ILP before it reports its gap")
    search.add_argument("--for", dest="for_trainer", choices=_TRAINERS,
                        help="also find the fastest plan this trainer can express (one dp/tp "
                        "for the whole model, its schedules, checkpointing and ZeRO stages), "
                        "priced beside the found plan; -o then writes it, for export")
    search.add_argument("--check", action="store_true",
                        help="dry-run the chosen plan's fullest rank before printing (as "
                        "`autoplan run --dry-run`, in fp32) and show what it held")
    search.add_argument("--json", action="store_true", help="print JSON")
    search.add_argument("-o", "--output", help="write the plan here (plan.json)")
    _add_cache_argument(search)
    search.set_defaults(handler=_cmd_search)

    run = sub.add_parser("run", help="train a model under a plan on local processes or "
                         "torchrun, and compare with the prediction")
    run.add_argument("--model", required=True, help="model spec or preset name")
    run.add_argument("--plan", required=True,
                     help='plan.json, or "dp=..,tp=..,pp=..,micro_batch=..,zero=.."')
    run.add_argument("--nproc", type=int, help="local processes (default: the plan's world "
                     "size, dp x tp x pp for shorthand; under torchrun: the launched world)")
    run.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    run.add_argument("--warmup", type=int, default=2,
                     help="steps left out of the measured step time (default 2)")
    run.add_argument("--global-batch", type=int, help="samples per step (default: the plan "
                     "file's, or 2 micro-batches per pipeline chunk)")
    run.add_argument("--verify", action="store_true", help="also train in one process and "
                     "compare losses, gradients and parameters; exit 1 when they differ")
    run.add_argument("--force", action="store_true",
                     help="run a plan predicted not to fit memory")
    run.add_argument("--profile", help="profile folder or profile.json, for the prediction")
    run.add_argument("--cluster", help="cluster the prediction is for (default "
                     "local-cpu:procs=NPROC)")
    run.add_argument("--memory-limit", type=float, help="GiB per device for the fit check "
                     "(default: the device's memory)")
    run.add_argument("--seed", type=int, default=0, help="model and data seed")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    run.add_argument("--timeout", type=float, default=300.0,
                     help="seconds without a finished step before the workers are stopped")
    run.add_argument("--dry-run", action="store_true",
                     help="play one rank of the plan's whole world in this process (torch's "
                     "fake process group: no communication; fake tensors on a CPU, real on "
                     "CUDA) with the executor's code, and weigh its memory against the "
                     "prediction; the world is the plan's (or --nproc)")
    run.add_argument("--rank", help="with --dry-run: the rank to play, or 'all-stages' (the "
                     "first rank of every stage); default: the stage predicted fullest")
    run.add_argument("--json", action="store_true", help="print JSON")
    _add_cache_argument(run)
    run.set_defaults(handler=_cmd_run)

    validate = sub.add_parser("validate", help="profile, predict and really run many plans "
                              "on local processes; report MAPE, Spearman, regret")
    validate.add_argument("--model", required=True, help="model spec or preset name")
    validate.add_argument("--nproc", type=int, default=4, help="local processes (default 4)")
    validate.add_argument("--global-batch", type=int, default=16, help="samples per step")
    validate.add_argument("--top-k", type=int, default=10, help="plans to run, besides DDP "
                          "and FSDP (default 10)")
    validate.add_argument("--steps", type=int, default=8, help="steps per run (default 8)")
    validate.add_argument("--warmup", type=int, default=3, help="steps left out (default 3)")
    validate.add_argument("--profile", help="a profile made with --in-situ --nproc N "
                          "--threads 1 --dtype fp32 (default: measure one)")
    validate.add_argument("--json", action="store_true", help="print JSON")
    validate.add_argument("-o", "--output", help="folder for plans.csv, scatter.png, profile/")
    _add_cache_argument(validate)
    validate.set_defaults(handler=_cmd_validate)

    plot = sub.add_parser("plot", help="draw a plan's pipeline schedule (Gantt chart per "
                          "stage) and memory per stage as a PNG")
    plot.add_argument("plan", help="plan.json (from `autoplan search -o` or `inspect -o`)")
    plot.add_argument("-o", "--output", required=True, help="picture to write, e.g. plan.png")
    plot.add_argument("--model", help="model spec or graph.json (default: the plan's model)")
    plot.add_argument("--cluster", help="cluster spec (default: the plan's cluster)")
    _add_pricing_arguments(plot)
    _add_cache_argument(plot)
    plot.set_defaults(handler=_cmd_plot)

    export = sub.add_parser("export", help="write a plan as torchtitan overrides, Megatron-LM "
                            "arguments or DeepSpeed JSON")
    export.add_argument("plan", help="plan.json")
    export.add_argument("--to", required=True, choices=_TRAINERS,
                        help="target trainer")
    export.add_argument("--dtype", choices=_DTYPES, default="bf16",
                        help="training dtype (a plan does not record it; default bf16)")
    export.add_argument("-o", "--output", help="file to write (default: print)")
    export.set_defaults(handler=_cmd_export)

    for name, text in _NOT_BUILT.items():
        stub = sub.add_parser(name, help=f"{text} (not built yet)")
        stub.set_defaults(handler=_not_built(name))
    return parser


def _add_pricing_arguments(parser: argparse.ArgumentParser) -> None:
    """What the cost model needs besides the plan: estimate and plot take the same."""
    parser.add_argument("--profile", help="profile folder or profile.json (default: the "
                        "cluster's datasheet figures)")
    parser.add_argument("--dtype", choices=_DTYPES, default="bf16")
    parser.add_argument("--attention", choices=("flash", "math"), default="flash")
    parser.add_argument("--memory-limit", type=float, help="GiB per device (default: the "
                        "device's memory)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")


def _add_cache_argument(parser: argparse.ArgumentParser) -> None:
    """--no-cache, for the commands that trace a model spec (autoplan/graph_cache.py)."""
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="trace the model even if the graph cache holds it, and leave "
                        "the cache as it is (cache folder: $AUTOPLAN_CACHE_DIR, else "
                        "~/.cache/autoplan/graphs)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0 ok; 2 bad input or not built; 1 a runtime
    failure (a worker died or stalled, or --verify found a difference); 130 Ctrl-C."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in _NOT_BUILT:  # those refuse anything, arguments or not
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="autoplan: %(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except WorkerFailed as err:  # a worker died or stalled; the input was fine
        if args.debug:
            raise
        print(f"autoplan {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except AutoplanError as err:
        if args.debug:
            raise
        print(f"autoplan {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"autoplan {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader (e.g. `| head`) left: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except OSError as err:  # a path that cannot be read or written
        if args.debug:
            raise
        print(f"autoplan {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """The message on one line: line breaks that came in with the input are escaped."""
    return str(err).replace("\r", "\\r").replace("\n", "\\n")


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        print(f"autoplan {name}: not built yet ({_NOT_BUILT[name]}); "
              "see the project's open issues", file=sys.stderr)
        return 2
    return handler


def _cmd_models(args: argparse.Namespace) -> int:
    from autoplan.app.report import models_table, preset_rows

    rows = preset_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _console().print(models_table(rows))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from autoplan.app.report import graph_summary, layer_table, plan_table
    from autoplan.inspection import inspect_model

    console = _console(stderr=True)
    with console.status(f"tracing {args.model} on the meta device"):
        result = inspect_model(args.model, dtype=args.dtype, attention=args.attention,
                               plan=args.plan, world_size=args.world_size,
                               global_batch=args.global_batch, cache=args.cache)
    if args.output:
        _write_outputs(Path(args.output), result)
    if args.json:
        print(json.dumps(graph_summary(result.graph, per_layer=True)
                         | ({"plan": json.loads(result.plan.to_json())} if result.plan else {}),
                         indent=1))
        return 0
    out = _console()
    out.print(layer_table(result.graph, group=not args.all))
    if result.plan:
        out.print(plan_table(result.plan))
    return 0


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise AutoplanError(f"{what} must be integers separated by commas, got '{text}'") from None


def _cmd_profile(args: argparse.Namespace) -> int:
    from autoplan.app.profile import ProfileOptions, run_profile
    from autoplan.profiler import profile_tables, write_profile

    sizes = _int_list(args.comm_sizes, "--comm-sizes") if args.comm_sizes else None
    options = ProfileOptions(
        model=args.model, mode=args.mode, cluster=args.cluster, nproc=args.nproc,
        micro_batches=_int_list(args.micro_batches, "--micro-batches"),
        tps=_int_list(args.tp, "--tp"), repeats=args.repeats, warmup=args.warmup,
        threads=args.threads, dtype=args.dtype, device=args.device, comm_sizes=sizes,
        comm=not args.no_comm, in_situ=args.in_situ,
        **({"collectives": tuple(c.strip() for c in args.collectives.split(",") if c.strip())}
           if args.collectives else {}))
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 alone reports
    with _ProgressBars(quiet) as bars:
        profile = run_profile(options, bars.on_step)
    if profile is None:  # a torchrun rank other than 0: rank 0 writes the files
        return 0
    paths = write_profile(profile, args.output)
    out = _console()
    for table in profile_tables(profile):
        out.print(table)
    out.print(f"wrote {', '.join(str(p) for p in paths)} (content hash {profile.content_hash})")
    return 0


class _ProgressBars:
    """One rich progress bar per stage of a long job (collectives, layers, runs): what is
    being done, done / planned, time elapsed and the estimate of the time left, which rich
    takes from the pace of the work done so far."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            console=_console(stderr=True), transient=True, disable=quiet)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _ProgressBars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def on_step(self, stage: str, text: str, done: int | None = None,
                planned: int | None = None) -> None:
        """A step of `stage` done: `done` of `planned` when counted, else one more."""
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=None)
        task, description = self.tasks[stage], f"{stage}: {text[:70]}"
        if done is None:
            self.progress.update(task, advance=1, description=description)
        else:
            self.progress.update(task, completed=done, total=planned, description=description)


def _cmd_estimate(args: argparse.Namespace) -> int:
    from autoplan.app.estimate import EstimateOptions, run_estimate

    options = EstimateOptions(
        model=args.model, cluster=args.cluster, global_batch=args.global_batch, plan=args.plan,
        seq=args.seq, profile=args.profile, dtype=args.dtype, attention=args.attention,
        memory_limit_gib=args.memory_limit, optimizer=args.optimizer, cache=args.cache)
    with _console(stderr=True).status(f"estimating {args.model} on {args.cluster}"):
        plan, estimate = run_estimate(options)
    if args.json:
        print(json.dumps(estimate.to_dict() | {"plan": json.loads(plan.to_json())}, indent=1))
        return 0
    from autoplan.cost_model import estimate_tables

    out = _console()
    for table in estimate_tables(plan, estimate):
        out.print(table)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from autoplan.app.run import RunOptions, report_lines, run_plan

    options = RunOptions(
        model=args.model, plan=args.plan, nproc=args.nproc, steps=args.steps,
        global_batch=args.global_batch, warmup=args.warmup, verify=args.verify,
        force=args.force, profile=args.profile, cluster=args.cluster,
        memory_limit_gib=args.memory_limit, seed=args.seed, timeout_s=args.timeout,
        device=args.device, cache=args.cache)
    if args.rank is not None and not args.dry_run:
        raise AutoplanError("--rank applies to --dry-run only")
    if args.dry_run:
        return _dry_run(options, args.rank, args.json)
    report = run_plan(options)  # a dead worker raises RunFailed: main() exits 1
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for line in report_lines(report):
            print(line)
    if report.note:
        print(f"autoplan run: {report.note}", file=sys.stderr)
    return 0 if report.comparison is None or report.comparison.ok else 1


def _dry_run(options: RunOptions, rank: str | None, as_json: bool) -> int:
    from autoplan.app.dry_run import dry_run, dry_run_lines

    if options.verify:
        raise AutoplanError("--verify compares values, which a dry run does not compute")
    report = dry_run(options, rank)
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for line in dry_run_lines(report):
            print(line)
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from autoplan.app.search import SearchCommand, check_line, dry_run_check, run_search
    from autoplan.search import result_json, search_tables

    command = SearchCommand(
        model=args.model, cluster=args.cluster, global_batch=args.global_batch, seq=args.seq,
        profile=args.profile, solver=args.solver, top_k=args.top_k,
        memory_limit_gib=args.memory_limit, max_tp=args.max_tp,
        fix=",".join(filter(None, [args.fix, args.schedule and f"schedule={args.schedule}"]))
        or None, dtype=args.dtype,
        attention=args.attention, time_limit_s=args.time_limit, output=args.output,
        cache=args.cache, for_trainer=args.for_trainer, check=args.check)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=_console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"tracing {args.model}", total=None)

        def on_progress(text: str, done: int, total: int) -> None:
            bar.update(task, description=text, completed=done, total=total)

        result = run_search(command, on_progress)
        if args.check:
            bar.update(task, description="dry run of the plan's fullest rank", completed=0,
                       total=None)
            checked = dry_run_check(command, result)
    if args.json:
        print(json.dumps(result_json(result) | (
            {"check": checked.to_dict()} if args.check else {}), indent=1))
        return 0
    out = _console()
    for table in search_tables(result, check_line(checked) if args.check else None):
        out.print(table)
    if args.output:
        out.print(f"wrote {args.output}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from autoplan.app.validate import ValidateOptions, validate, write_outputs

    options = ValidateOptions(model=args.model, nproc=args.nproc, global_batch=args.global_batch,
                              top_k=args.top_k, steps=args.steps, warmup=args.warmup,
                              profile=args.profile, output=args.output, cache=args.cache)
    with _ProgressBars() as bars:
        result = validate(options, bars.on_step)
    paths = write_outputs(result, args.output) if args.output else []
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    from rich.table import Table

    table = Table(title=f"{args.model}: predicted vs measured on {args.nproc} local processes")
    for name in ("plan", "role", "predicted", "measured", "error", "state memory error"):
        table.add_column(name)
    for p in result.plans:
        table.add_row(p.plan, p.role, f"{p.predicted_s * 1e3:.0f} ms",
                      f"{p.measured_s * 1e3:.0f} ms", f"{p.time_error:+.1%}",
                      f"{p.memory_error:+.1%}")
    out = _console()
    out.print(table)
    out.print(f"MAPE {result.mape:.1%}, Spearman {result.spearman:.2f}, regret "
              f"{result.regret:.2f}, memory error {result.memory_error:.1%}")
    for note in result.notes:
        out.print(f"note: {note}")
    for path in paths:
        out.print(f"wrote {path}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from autoplan.app.plotting import PlotOptions, run_plot

    options = PlotOptions(plan=args.plan, output=args.output, model=args.model,
                          cluster=args.cluster, profile=args.profile, dtype=args.dtype,
                          attention=args.attention, memory_limit_gib=args.memory_limit,
                          optimizer=args.optimizer, cache=args.cache)
    with _console(stderr=True).status(f"drawing {args.plan}"):
        _, estimate, timeline = run_plot(options)
    print(f"wrote {args.output}: simulated pipeline {timeline.makespan_s:.4g} s, bubble "
          f"{timeline.bubble_fraction():.0%}; predicted step {estimate.step_time_s:.4g} s")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from autoplan.app.export import export_plan
    from autoplan.io import atomic_write_text
    from autoplan.plan import load_plan

    if not Path(args.plan).is_file():
        raise AutoplanError(f"plan file '{args.plan}' does not exist")
    result = export_plan(load_plan(args.plan), args.to, args.dtype)
    for note in result.notes:
        print(f"autoplan export: note: {note}", file=sys.stderr)
    if args.output:
        atomic_write_text(args.output, result.text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(result.text)
    return 0


def _write_outputs(folder: Path, result: InspectResult) -> None:
    result.graph.save(folder / "graph.json")
    if result.plan:
        result.plan.save(folder / "plan.json")


def _console(stderr: bool = False):  # noqa: ANN202
    """A rich console; when not on a terminal, wide enough that tables do not wrap."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "160"))
    return Console(stderr=stderr, width=width)


if __name__ == "__main__":
    sys.exit(main())
