"""The flagship's step of an FSDP2-sharded model: each tensor stepped by one rank against every rank stepping all.

::

    python benchmarks/sharded_step.py                      # 2 processes, a 4.5M-parameter stack of linear layers
    python benchmarks/sharded_step.py --processes 2 --width 256 --layers 4 --repeats 10

Launches ``torchrun --nproc-per-node P`` on this script (gloo, one thread per process), shards a stack of linear
layers (``--layers`` square ``--width`` ones and a 4x-wide pair, as in a transformer's MLP) with ``fully_shard``,
and times :class:`~learned_optim.LearnedOptimizer` with the flagship (:data:`learned_optim.FLAGSHIP`, as shipped:
its step orthogonalises every matrix) stepping it with ``sharded_step="owner"`` (each whole tensor's step on one
rank: :mod:`learned_optim.sharded_step`) and ``"every_rank"`` (every rank all-gathers and steps every tensor),
round-robin in one run, the same gradients for both. Each timing is the wall time of one ``step()`` between two
barriers (the slowest rank's). Prints the median and best per mode, their ratio, and whether both modes gave the
same parameters bit for bit. Measures compute shared out on this machine's cores; on GPUs the ratio also depends on
the interconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_flags_line, machine_header, table  # noqa: E402

MODES = ("owner", "every_rank")


def sharded_model(width: int, layers: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    blocks = [nn.Linear(width, width) for _ in range(layers)]
    blocks += [nn.Linear(width, 4 * width), nn.Linear(4 * width, width)]
    model = nn.Sequential(*blocks)
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import learned_optim

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    models = {mode: sharded_model(args.width, args.layers) for mode in MODES}
    opts = {
        mode: learned_optim.from_pretrained(learned_optim.FLAGSHIP, models[mode].parameters(), sharded_step=mode)
        for mode in MODES
    }
    x = torch.randn(32, args.width, generator=torch.Generator().manual_seed(1))
    for model in models.values():
        model(x).square().mean().backward()
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats + 1):  # (the first round creates the state: not timed)
        for mode in MODES:
            dist.barrier()
            start = time.perf_counter()
            opts[mode].step()
            dist.barrier()
            if repeat:
                seconds[mode].append(time.perf_counter() - start)
    params = [[p.full_tensor() for p in models[mode].parameters()] for mode in MODES]
    same = all(torch.equal(a, b) for a, b in zip(*params, strict=True))
    if dist.get_rank() == 0:
        numel = sum(p.numel() for p in models["owner"].parameters())
        Path(args.out).write_text(json.dumps({"seconds": seconds, "same": same, "numel": numel}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8, help="square layers before the 4x-wide pair")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timings.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        command += [str(args.processes), __file__, *(argv if argv is not None else sys.argv[1:]), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, env=env, check=True)
        result = json.loads(out.read_text())
    torch.set_num_threads(1)  # (as each worker: the header says so)
    print(f"# The flagship's step of an FSDP2-sharded model, {args.processes} processes (gloo)\n")
    print(machine_header())
    print(cpu_flags_line())
    print(
        f"\nmodel: {args.layers} x Linear({args.width}, {args.width}), Linear({args.width}, {4 * args.width}), "
        f"Linear({4 * args.width}, {args.width}): {result['numel'] / 1e6:.2f}M parameters, "
        f"{2 * (args.layers + 2)} tensors; {args.repeats} timed steps per mode, round-robin\n"
    )
    rows, medians = [], {}
    for mode in MODES:
        times = result["seconds"][mode]
        medians[mode] = statistics.median(times)
        rows.append([mode, f"{medians[mode] * 1e3:.1f}", f"{min(times) * 1e3:.1f}"])
    print(table(["sharded_step", "median ms per step", "best ms"], rows))
    print(f"\nevery_rank / owner (median): {medians['every_rank'] / medians['owner']:.2f}x")
    print(f"same parameters bit for bit: {result['same']}")


if __name__ == "__main__":
    main()
