"""Command line of meta-training: ``python -m learned_optim.meta train CONFIG [options]``.

::

    python -m learned_optim.meta train learned_optim/meta/configs/l2o-lstm.yaml --out runs/l2o-lstm
    python -m learned_optim.meta train learned_optim/meta/configs/l2o-lstm.yaml --out runs/l2o-lstm --resume
    python -m learned_optim.meta train CONFIG --set unroll.segment_length=10 --set seed=3 --device cuda

Data-parallel over processes (each rank runs its own trajectories; meta-gradients are averaged)::

    torchrun --nproc-per-node 2 -m learned_optim.meta train l2o-lstm --out runs/l2o-lstm-dp

Particle-parallel PES (every rank runs the same trajectory and unrolls its share of the PES particles: the
single-process run bit for bit, faster: 1.5x the meta-steps per second on a 2-vCPU VM,
``benchmarks/particle_parallel.py``)::

    torchrun --nproc-per-node 2 -m learned_optim.meta train adafac-mlp-adam-magnitude-tbv-nomup --parallel particles

PES particles unrolled together, each inner step one ``torch.func.vmap`` call over a process's particles (the same
estimate to float rounding, not bit for bit: a run of its own; 1.48x the meta-steps per second on one process,
``benchmarks/batched_particles.py``)::

    python -m learned_optim.meta train adafac-mlp-adam-magnitude-tbv-nomup --set estimator.batch_particles=true

Under ``torchrun`` (``WORLD_SIZE`` > 1) the command initialises the process group (gloo on CPU, NCCL
on CUDA, each rank on its ``LOCAL_RANK`` device) and passes it to :class:`MetaTrainer`.

``CONFIG`` is a JSON or YAML file laid out as :class:`learned_optim.meta.config.MetaTrainConfig`; a bare
name such as ``l2o-lstm`` refers to the bundled ``learned_optim/meta/configs/<name>.yaml``. The run
folder gets ``log.jsonl``, ``checkpoint/`` and, when training finishes, ``model/`` (a zoo folder for
``learned_optim.from_pretrained``).

Weight averaging of fine-tunes of one parent (:func:`learned_optim.meta.soup.weight_soup`)::

    python -m learned_optim.meta soup runs/ft-s0/model runs/ft-s1/model --out runs/ft-soup
    python -m learned_optim.meta soup runs/ft-s0/model runs/ft-s1/model --out runs/b2 --net second_moment_decay=0.95
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from ..schedules import SCHEDULES
from .config import CONFIG_DIR, load_config, parse_override, resolve_config_path

__all__ = ["main", "build_parser", "resolve_config_path", "CONFIG_DIR"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m learned_optim.meta", description="Meta-train learned optimizers.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="meta-train an optimizer from a JSON/YAML config",
        description="Meta-train an optimizer; writes OUT/log.jsonl, OUT/checkpoint/ and OUT/model/.",
    )
    train.add_argument("config", help="config file, or the name of a bundled config (e.g. l2o-lstm)")
    train.add_argument("--device", choices=["cpu", "cuda"], default=None, help="overrides the config's device")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    train.add_argument("--out", default=None, help="run folder (default: the config's out_dir or runs/<name>)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field by dotted key, e.g. --set unroll.segment_length=10 (repeatable)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--parallel",
        choices=["data", "particles"],
        default="data",
        help="under torchrun, what the processes split: their own trajectories, averaging meta-gradients (data; "
        "another run than one process's), or the PES particles of one trajectory (particles; the single-process "
        "run bit for bit, faster)",
    )
    sub.add_parser("configs", help="list the bundled configs")
    soup = sub.add_parser(
        "soup",
        help="average the weights of fine-tunes of one parent into one checkpoint (a uniform model soup)",
        description="Write the uniform weight average of two or more checkpoint folders of one net and parent.",
    )
    soup.add_argument("sources", nargs="+", help="checkpoint folders (the same family, net and parent)")
    soup.add_argument("--out", required=True, help="folder to write")
    soup.add_argument("--name", default=None, help="zoo name of the soup (default: the first source's + -soup)")
    soup.add_argument("--description", default=None, help="its description (default: lists the ingredients)")
    soup.add_argument(
        "--schedule", choices=SCHEDULES, default=None, help="recommended lr schedule (default: the sources')"
    )
    soup.add_argument(
        "--parent", default=None, help="the sources' common parent checkpoint folder (needed with --scale)"
    )
    soup.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="write parent + SCALE x (the sources' mean - parent): <1 toward the parent, >1 past the mean (default 1)",
    )
    add_net_settings_option(
        soup, "change a net setting the weights do not depend on, e.g. --net second_moment_decay=0.95 (repeatable)"
    )
    reconfigure = sub.add_parser(
        "reconfigure",
        help="change, in place, net settings of a checkpoint folder that its weights do not depend on",
        description="Change net settings a checkpoint's weights do not depend on, in its config.json, recorded there "
        "and in its card (learned_optim.hub.reconfigure_checkpoint); the weights are not touched.",
    )
    reconfigure.add_argument("folder", help="the checkpoint folder")
    add_net_settings_option(reconfigure, "the setting to change, e.g. --net newton_schulz_dtype=auto (repeatable)")
    reconfigure.add_argument(
        "--optimizer",
        dest="optimizer_defaults",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an optimizer default to change (config.json's optimizer, what from_pretrained passes when the caller "
        "does not), e.g. --optimizer lr=0.01 (repeatable)",
    )
    return parser


def add_net_settings_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--net FIELD=VALUE`` (repeatable) into ``args.net_overrides``, read by :func:`net_settings`."""
    parser.add_argument("--net", dest="net_overrides", action="append", default=[], metavar="FIELD=VALUE", help=help)


def net_settings(items: Sequence[str], option: str = "--net") -> dict[str, Any]:
    """``["field=value", ...]`` (values parsed as YAML) -> ``{field: value}``; the fields (of the net's configuration,
    or for ``--optimizer`` optimizer defaults) have no dots."""
    settings = {}
    for item in items:
        keys, value = parse_override(item)
        if len(keys) != 1:
            example = "lr=0.01" if option == "--optimizer" else "second_moment_decay=0.95"
            raise ValueError(f"{option} {item!r}: give a field and a value, e.g. {example}")
        settings[keys[0]] = value
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "configs":
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            cfg = load_config(path)
            print(f"{path.stem}\n    {cfg.description or ''}\n    time: {cfg.expected_time or 'not stated'}")
        return 0

    if args.command == "soup":
        from .soup import weight_soup

        try:
            soup_folder = weight_soup(
                args.sources,
                args.out,
                name=args.name,
                description=args.description,
                schedule=args.schedule,
                command=shlex.join(["python", "-m", "learned_optim.meta", *argv]),
                parent=args.parent,
                scale=args.scale,
                net_overrides=net_settings(args.net_overrides),
            )
        except ValueError as err:  # CheckpointError included
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"soup of {len(args.sources)} checkpoints written to {soup_folder}")
        return 0

    if args.command == "reconfigure":
        from ..hub import reconfigure_checkpoint

        try:
            settings = net_settings(args.net_overrides)
            optimizer = net_settings(args.optimizer_defaults, option="--optimizer")
            if not settings and not optimizer:
                raise ValueError("give at least one --net FIELD=VALUE or --optimizer KEY=VALUE")
            record = reconfigure_checkpoint(
                args.folder,
                settings,
                command=shlex.join(["python", "-m", "learned_optim.meta", *argv]),
                optimizer=optimizer,
            )
        except (ValueError, OSError) as err:  # CheckpointError included
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{args.folder}: " + ", ".join(f"{k} = {v!r}" for k, v in record["settings"].items()))
        return 0

    from .trainer import MetaTrainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", "--nproc-per-node", str(world), "-m"] if world > 1 else ["python", "-m"]
    command = shlex.join([*launcher, "learned_optim.meta", *argv])
    created_group = False
    trainer: MetaTrainer | None = None
    try:
        config = load_config(resolve_config_path(args.config), args.overrides)
        if world > 1:
            created_group = _init_process_group(args.device or config.device)
        trainer = MetaTrainer(
            config,
            out_dir=args.out,
            device=args.device,
            progress=not args.no_progress,
            command=command,
            parallel=args.parallel,
        )
        folder = trainer.train(resume=args.resume)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = "runs it" if trainer is None else f"--resume goes on from the last checkpoint in {trainer.out_dir}"
        print(f"\ninterrupted; the same command with {how}", file=sys.stderr)
        return 130
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    assert trainer is not None
    if trainer.rank == 0:
        print(
            f"meta-training finished ({trainer.finish_reason}) after {trainer.meta_steps} meta-steps"
            f"{f' on {world} processes' if world > 1 else ''}; optimizer written to {folder}"
        )
    return 0


def _init_process_group(device: str) -> bool:
    """The process group of a ``torchrun`` launch: gloo on CPU, NCCL on CUDA (one device per local rank).

    Returns False (and leaves it alone) when the caller already initialised one.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True
