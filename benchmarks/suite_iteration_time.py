"""Training iteration time on the benchmark suite's own models: AdamW against learned optimizers, side by side.

::

    python benchmarks/suite_iteration_time.py --optimizer adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal
    python benchmarks/suite_iteration_time.py --optimizer NAME_OR_FOLDER --net newton_schulz_dtype=bfloat16 \\
        --tasks stdlib-transformer-lm-2m shapes-cnn
    python benchmarks/suite_iteration_time.py --optimizer NAME_OR_FOLDER --baseline muon-adamw
    python benchmarks/suite_iteration_time.py --optimizer NAME_OR_FOLDER --step-only --tasks diabetes-mlp
    python benchmarks/suite_iteration_time.py --optimizer NAME_OR_FOLDER --tasks ... \
        --speedups benchmarks/results/bench/orthogonal-ns3/suite/results.json --contender "NAME [adamw]"

For every task (its model at seed 0 and one training batch, as the suite draws them) one iteration, ``zero_grad``,
forward, the task's loss, backward and the optimizer's ``step`` (with ``--step-only`` the ``step`` alone, on the
gradient of one backward), is timed for ``torch.optim.AdamW`` and for each
learned optimizer (its checkpoint's net and defaults, as ``from_pretrained`` builds it) and each ``--baseline`` of the
suite's registry (:data:`learned_optim.bench.baselines.BASELINES`, at lr 1e-3; one closure per step, so SAM-like
baselines that evaluate it several times are timed with their extra gradients), each on its own copy of the model,
round-robin in one process (``benchmarks/_common.py``: process CPU time, best of the repeats, one torch thread by
default; ``--device cuda``: the model, its batch and the optimizers on the GPU, synchronised wall time).
``--net FIELD=VALUE`` (repeatable) adds, for every learned optimizer, a variant whose net has those settings changed
(``UpdateRule.reconfigured``: the same weights), e.g. the orthogonalisation's products in bfloat16.
Prints the machine (``lscpu``'s model and flags) with the table: a speed figure holds for the machine it was
measured on.

With ``--speedups RESULTS --contender NAME`` (a suite ``results.json`` and one of its contenders: a ``--baseline``
of that name, else the first ``--optimizer``) it also estimates the speed-up in time on this machine: the suite's
speed-up of that contender on
each task (steps to tuned AdamW's final training loss, from the results) divided by the iteration-time ratio measured
here, with their interquartile mean over the tasks: above 1, the optimizer reaches AdamW's final training loss in less
time than AdamW. The suite's runs record their own time per step, but from runs of different sessions, machines and
loads; the ratio measured here, side by side, is what the estimate takes.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import clock_name, cpu_flags_line, machine_header, measure, table  # noqa: E402

from learned_optim import LearnedOptimizer  # noqa: E402
from learned_optim.bench.baselines import BASELINES  # noqa: E402
from learned_optim.bench.stats import iqm  # noqa: E402
from learned_optim.bench.tasks import get_task  # noqa: E402
from learned_optim.functional import to_device  # noqa: E402
from learned_optim.hub import load_rule  # noqa: E402
from learned_optim.meta.cli import add_net_settings_option, net_settings  # noqa: E402

#: ``--step-only``: steps timed in a row per timing (a single step of a small model is shorter than the clock's noise
#: and than the caches' refill after the other optimizers' round).
STEP_ONLY_CALLS = 20

#: The suite's models whose iteration the orthogonalisation changes most (session 33's four).
DEFAULT_TASKS = ("stdlib-transformer-lm-2m", "stdlib-transformer-lm", "shapes-cnn", "digits-resnet-bn")


def learned(name: str, settings: dict[str, object], params: list) -> torch.optim.Optimizer:
    """The learned optimizer ``name`` with its checkpoint's defaults, its net reconfigured with ``settings``."""
    rule, config = load_rule(name)
    return LearnedOptimizer(params, rule.reconfigured(**settings) if settings else rule, **config.get("optimizer", {}))


def optimizers(
    names: list[str], settings: dict[str, object], baselines: Sequence[str] = ()
) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    """AdamW, the ``baselines`` and every learned optimizer (and, with ``settings``, its reconfigured variant) as
    factories."""
    made: dict[str, Callable[[list], torch.optim.Optimizer]] = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-3)}
    for name in baselines:
        if name.lower() not in BASELINES:
            raise SystemExit(f"unknown baseline {name!r}; known: {', '.join(sorted(BASELINES))}")
        made[name] = functools.partial(BASELINES[name.lower()].build, lr=1e-3)
    listing = ",".join(f"{k}={v}" for k, v in settings.items())
    for name in names:
        label = Path(name).name
        made[label] = functools.partial(learned, name, {})
        if settings:
            made[f"{label} [{listing}]"] = functools.partial(learned, name, settings)
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="suite task names")
    parser.add_argument("--optimizer", action="append", default=[], help="learned optimizer (repeatable)")
    parser.add_argument("--baseline", action="append", default=[], help="suite baseline, e.g. muon-adamw (repeatable)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model, its batch and the optimizers there)")
    add_net_settings_option(parser, "a variant of every learned optimizer with this net setting (repeatable)")
    parser.add_argument(
        "--step-only",
        action="store_true",
        help="time the optimizer's step alone (one backward first, then step after step on that gradient)",
    )
    parser.add_argument("--speedups", type=Path, help="a suite results.json: estimate the speed-up in time (above)")
    parser.add_argument(
        "--contender",
        help="the --speedups contender: a --baseline's name, or e.g. 'NAME [adamw]' (the first --optimizer as its "
        "checkpoint has it, not a --net variant)",
    )
    parser.add_argument(
        "--alone",
        type=int,
        metavar="CALLS",
        help="time each optimizer alone, in a fresh process of its own, CALLS iterations (or steps) in a row: the "
        "mean CPU time and page faults per call, as in a training script, whose memory allocator's state is its own "
        "(the round-robin timing in one process, the default, hides what the allocator costs)",
    )
    parser.add_argument("--alone-run", nargs=2, metavar=("TASK", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.alone is not None and args.speedups is not None:
        parser.error("--speedups divides by the round-robin timing's ratio: leave out --alone")
    timed_label = None  # the timings the estimate divides by: the contender's own
    if (args.speedups is None) != (args.contender is None):
        parser.error("--speedups and --contender go together")
    if args.step_only and args.speedups is not None:
        parser.error("--speedups divides by the whole iteration's ratio: leave out --step-only")
    if args.contender is not None:
        if args.contender in args.baseline:
            timed_label = args.contender
        elif args.contender.lower() in BASELINES:
            parser.error(f"--contender {args.contender} is a suite baseline: time it with --baseline {args.contender}")
        elif args.optimizer:
            timed_label = Path(args.optimizer[0]).name
        else:
            parser.error("--contender is a --baseline's name, or the first --optimizer's results")
    step_speedups = _step_speedups(args.speedups, args.contender) if args.speedups is not None else {}
    torch.set_num_threads(args.threads)
    factories = optimizers(args.optimizer, net_settings(args.net_overrides), args.baseline)
    if args.alone_run is not None:
        _alone_run(args, factories)
        return
    print(f"# Training iteration time on the suite's models\n\n{machine_header(args.device)}\n\n{cpu_flags_line()}\n")
    rows = []
    time_rows: list[list[str]] = []
    time_speedups: list[float] = []
    for task_name in args.tasks:
        workload = get_task(task_name).bind()
        batch = to_device(workload.batch(torch.Generator().manual_seed(0)), args.device)
        model = workload.build_model(0).to(args.device)
        params = sum(p.numel() for p in model.parameters())
        calls = STEP_ONLY_CALLS if args.step_only else 1
        if args.alone is not None:  # each optimizer in a process of its own, one after another
            alone = {label: _alone(argv, task_name, label) for label in factories}
            for label, (seconds, faults) in alone.items():
                ratio = f"{seconds / alone['adamw'][0]:.2f}x"
                shown = _milliseconds(seconds / calls)
                rows.append([task_name, f"{params / 1e6:.2f}M", label, shown, f"{faults / calls:.0f}", ratio])
            continue
        steps = {label: _timed(workload, batch, model, make, args.step_only) for label, make in factories.items()}
        timings = measure(steps, repeats=args.repeats, warmup=2, device=args.device)
        reference = timings["adamw"].best
        for label, t in timings.items():
            rows.append(
                [task_name, f"{params / 1e6:.2f}M", label, _milliseconds(t.best / calls), f"{t.best / reference:.2f}x"]
            )
        if step_speedups:
            if task_name not in step_speedups:
                raise SystemExit(f"{args.speedups} has no {args.contender!r} on {task_name}")
            assert timed_label is not None
            ratio = timings[timed_label].best / reference
            time_speedups.append(step_speedups[task_name] / ratio)
            time_rows.append(
                [task_name, f"{step_speedups[task_name]:.2f}x", f"{ratio:.2f}x", f"{time_speedups[-1]:.2f}x"]
            )
    timed = "step" if args.step_only else "iteration"
    if args.alone is not None:
        clock = f"CPU, mean of {args.alone} in a row, alone"
        print(
            table(["task", "params", "optimizer", f"ms / {timed} ({clock})", f"page faults / {timed}", "/ AdamW"], rows)
        )
    else:
        clock = f"{clock_name(args.device)}, best"
        print(table(["task", "params", "optimizer", f"ms / {timed} ({clock})", "/ AdamW"], rows))
    if time_rows:
        print(f"\nSpeed-up in time of {args.contender} on this machine (steps from {args.speedups}):\n")
        time_rows.append(["IQM over tasks", "", "", f"{iqm(time_speedups):.2f}x"])
        print(table(["task", "speed-up (steps)", "iteration / AdamW's (here)", "speed-up in time"], time_rows))
    print(f"\nLoad at the end: {machine_header().split('load average ')[1]}")


def _milliseconds(seconds: float) -> str:
    """A time per call in ms, to three decimals below 10 ms."""
    milliseconds = seconds * 1e3
    return f"{milliseconds:.3f}" if milliseconds < 10 else f"{milliseconds:.1f}"


def _timed(
    workload: Any, batch: Any, model: torch.nn.Module, make: Callable[[list], torch.optim.Optimizer], step_only: bool
) -> Callable[[], None]:
    """What one timing calls for an optimizer made by ``make`` on its own copy of ``model``: an iteration
    (``zero_grad``, forward, the task's loss, backward, ``step``), or with ``step_only`` :data:`STEP_ONLY_CALLS` steps
    on the gradient of one backward."""
    copy_ = copy.deepcopy(model)
    opt = make(list(copy_.parameters()))
    if step_only:
        opt.zero_grad(set_to_none=True)
        workload.loss(copy_, batch).backward()
        return functools.partial(_steps, opt)

    def iteration() -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = workload.loss(copy_, batch)
            loss.backward()
            return loss

        opt.step(closure)

    return iteration


def _alone(argv: list[str], task_name: str, label: str) -> tuple[float, float]:
    """``--alone``: the CPU seconds and minor page faults per timed call of optimizer ``label`` on ``task_name``, from
    a fresh process of its own (this script with ``--alone-run``)."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--alone-run", task_name, label]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"--alone: {label} on {task_name} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["faults"]


def _alone_run(args: argparse.Namespace, factories: dict[str, Callable[[list], torch.optim.Optimizer]]) -> None:
    """The child of :func:`_alone`: ``--alone`` calls in a row after two untimed ones, their mean CPU time and minor
    page faults as one JSON line."""
    task_name, label = args.alone_run
    workload = get_task(task_name).bind()
    batch = to_device(workload.batch(torch.Generator().manual_seed(0)), args.device)
    call = _timed(workload, batch, workload.build_model(0).to(args.device), factories[label], args.step_only)
    for _ in range(2):
        call()
    faults, seconds = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
    for _ in range(args.alone):
        call()
    seconds = (time.process_time() - seconds) / args.alone
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.alone
    print(json.dumps({"seconds": seconds, "faults": faults}))


def _steps(opt: torch.optim.Optimizer) -> None:
    """:data:`STEP_ONLY_CALLS` steps of ``opt`` on the gradient it has."""
    for _ in range(STEP_ONLY_CALLS):
        opt.step()


def _step_speedups(results: Path, contender: str) -> dict[str, float]:
    """Each task's speed-up of ``contender`` in a suite ``results.json`` (its ``summary`` rows)."""
    rows = [row for row in json.loads(results.read_text())["summary"] if row["contender"] == contender]
    if not rows:
        raise SystemExit(f"{results} has no contender {contender!r}")
    return {row["task"]: float(row["speedup"]) for row in rows}


if __name__ == "__main__":
    main()
