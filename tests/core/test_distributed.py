"""LearnedOptimizer in multi-process training: DDP, ZeroRedundancyOptimizer, torch.distributed.checkpoint, FSDP2.

The checks run in 2 CPU processes (gloo) launched once by ``torchrun``; this file is also the worker
script::

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/core/test_distributed.py OUT_DIR

Each rank runs every scenario, records numbers (maximum differences, flags) to ``OUT_DIR/rank<r>.json``
and the pytest side asserts on them, so one launch (~10-20 s on a loaded 2-core machine) covers all
the tests below. Every scenario compares with a single-process run of the same model on the full
batch (DDP averages the two half-batch gradients, i.e. the full-batch mean gradient):

* DDP: parameters equal the single-process ones (to float rounding: all-reduce sums in another
  order) and are bit-identical across ranks, for every net family.
* ZeroRedundancyOptimizer(optimizer_class=LearnedOptimizer, rule=...): bit-identical to DDP with an
  unsharded LearnedOptimizer; consolidated state dict loads into a fresh ZeRO optimizer and resumes
  bit-identically.
* torch.distributed.checkpoint: get_state_dict's zero-lr state-creation step on a fresh optimizer
  changes nothing; save -> load into a fresh model/optimizer -> continue is bit-identical to the
  uninterrupted run.
* FSDP2 (fully_shard, uneven shards, one empty): parameters equal the single-process run (MLP's
  per-tensor statistics are all-reduced over shards); a NaN in one rank's shard skips the step on
  both ranks; its state is DTensor and round-trips through torch.distributed.checkpoint.

Data-parallel meta-training runs the meta-training CLI (``learned_optim.meta.cli.main``, what
``torchrun --nproc-per-node 2 -m learned_optim.meta train`` runs) in the same launch, and is compared
with one process computing the same two tasks' meta-gradients. Particle-parallel PES (``--parallel
particles``) runs there too, whole and interrupted, and is compared bit for bit with one process.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

FAMILIES = ["adafac_mlp", "dm_lstm", "mlp", "rnnprop"]
WHOLE_TENSOR_FAMILIES = ["adafac_mlp"]
#: FSDP2 runs every family, and the flagship's orthogonalised direction (adafac_mlp with Newton-Schulz steps): a
#: whole-tensor rule steps each sharded tensor whole (factored row/column state, per-tensor RMS, orthogonalisation).
FSDP_CASES = {**{f: (f, {}) for f in FAMILIES}, "adafac_mlp_orthogonal": ("adafac_mlp", {"newton_schulz_steps": 3})}
STEPS = 3
GLOBAL_BATCH = 16

#: One meta-step of the smoke config with plain SGD (so the weight change is -lr * meta-gradient) and no
#: curriculum/imitation, in float64 (the gradient is recovered from the weight change): each of the 2 ranks
#: unrolls its own task, the meta-gradients are averaged.
META_LR = 0.1
META_OVERRIDES = [
    "meta_epochs=1",
    "unroll.trajectory_length=3",
    "unroll.segment_length=3",
    "curriculum.enabled=false",
    "imitation.enabled=false",
    f"meta_optimizer={{name: sgd, lr: {META_LR}, grad_clip: null}}",
    "checkpoint_every=100",
    "dtype=float64",
]
#: PES on the smoke config: 2 pairs (4 particles, 2 per rank), 3 trajectories of 2 truncations, a checkpoint
#: after every meta-step (so an interruption after meta-step 3 leaves the particles mid-trajectory).
PES_OVERRIDES = [
    "meta_epochs=3",
    "estimator={kind: pes, num_pairs: 2, sigma: 0.01}",
    "curriculum.enabled=false",
    "imitation.enabled=false",
    "checkpoint_every=1",
]

#: The same with the particles batched (vmap) and spread over 2 task instances: 8 particles, each rank's 4 on both.
BATCHED_PES = ["estimator.batch_particles=true", "estimator.instances=2"]
#: Truncated BPTT over 2 task instances per meta-step, unrolled together.
TBPTT_INSTANCES = ["estimator.instances=2", "estimator.batch_particles=true"]


# ====================================================================================== worker side
def _model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # 7 output rows and a bias of 1: uneven FSDP2 shards, one of them empty on rank 1
        return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def _rule(family: str, **config):
    import learned_optim

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return learned_optim.FAMILIES[family](**config)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 1, generator=gen)


def _local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batch(step)
    per = GLOBAL_BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def _train(model: nn.Module, opt, steps, batch_of) -> None:
    for t in steps:
        x, y = batch_of(t)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _single_process(family: str, steps: int = STEPS, **config) -> torch.Tensor:
    from learned_optim import LearnedOptimizer

    model = _model()
    opt = LearnedOptimizer(model.parameters(), _rule(family, **config))
    _train(model, opt, range(steps), _batch)
    return _flat(model.parameters())


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    import torch.distributed as dist

    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def scenario_ddp(rank: int, world: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from learned_optim import LearnedOptimizer

    result = {}
    for family in FAMILIES:
        model = DDP(_model())
        opt = LearnedOptimizer(model.parameters(), _rule(family))
        _train(model, opt, range(STEPS), lambda t: _local_batch(t, rank, world))
        params = _flat(model.parameters())
        reference = _single_process(family)
        result[family] = {
            "max_diff_vs_single_process": _max_diff(params, reference),
            "max_abs_param": float(reference.abs().max()),
            "moved": _max_diff(params, _flat(_model().parameters())),
            "identical_across_ranks": _same_on_all_ranks(params),
        }
    return result


def scenario_zero(rank: int, world: int, out: Path) -> dict:
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from learned_optim import LearnedOptimizer

    batch_of = lambda t: _local_batch(t, rank, world)  # noqa: E731
    result = {}
    for family in FAMILIES:
        rule = _rule(family)
        model = DDP(_model())
        zero = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=LearnedOptimizer, rule=rule, lr=rule.default_lr
        )
        # the rule bound to the class instead stays out of ZeRO's param groups: its state dict loads weights-only
        bound_model = DDP(_model())
        bound = ZeroRedundancyOptimizer(
            bound_model.parameters(), optimizer_class=functools.partial(LearnedOptimizer, rule=rule)
        )
        _train(bound_model, bound, range(1), batch_of)
        bound.consolidate_state_dict(to=0)
        if rank == 0:
            buffer = io.BytesIO()
            torch.save(bound.state_dict(), buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        _train(model, zero, range(STEPS), batch_of)
        plain_model = DDP(_model())
        plain = LearnedOptimizer(plain_model.parameters(), rule)
        _train(plain_model, plain, range(STEPS), batch_of)
        owned = sum(len(g["params"]) for g in zero.optim.param_groups)
        identical = torch.equal(_flat(model.parameters()), _flat(plain_model.parameters()))
        moved = (_flat(plain_model.parameters()) - _flat(_model().parameters())).square().mean().sqrt()
        rel_diff = float((_flat(model.parameters()) - _flat(plain_model.parameters())).abs().max() / moved)
        # consolidate on rank 0, hand the state dict to every rank, resume a fresh ZeRO optimizer
        zero.consolidate_state_dict(to=0)
        payload = [zero.state_dict() if rank == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        resumed_model = DDP(_model())
        resumed_model.module.load_state_dict(model.module.state_dict())
        resumed = ZeroRedundancyOptimizer(
            resumed_model.parameters(), optimizer_class=LearnedOptimizer, rule=rule, lr=rule.default_lr
        )
        resumed.load_state_dict(copy.deepcopy(payload[0]))  # as from disk: rank 0's dict shares live tensors
        _train(model, zero, range(STEPS, STEPS + 2), batch_of)
        _train(resumed_model, resumed, range(STEPS, STEPS + 2), batch_of)
        result[family] = {
            "identical_to_unsharded": identical,
            "max_diff_vs_unsharded_per_rms_move": rel_diff,
            "params_owned_by_rank": owned,
            "resume_identical": torch.equal(_flat(model.parameters()), _flat(resumed_model.parameters())),
            "identical_across_ranks": _same_on_all_ranks(_flat(model.parameters())),
        }
    return result


def scenario_dcp(rank: int, world: int, out: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    from learned_optim import LearnedOptimizer

    batch_of = lambda t: _local_batch(t, rank, world)  # noqa: E731
    result = {}
    for family in FAMILIES:
        rule = _rule(family)
        model = DDP(_model())
        opt = LearnedOptimizer(model.parameters(), rule)
        _train(model, opt, range(STEPS), batch_of)
        model_sd, optim_sd = get_state_dict(model, opt)
        path = out / f"dcp-{family}"
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))

        fresh = DDP(_model(seed=7))
        fresh_opt = LearnedOptimizer(fresh.parameters(), rule)
        before = _flat(fresh.parameters()).clone()
        model_sd2, optim_sd2 = get_state_dict(fresh, fresh_opt)  # runs the zero-lr state-creation step
        noop = (
            torch.equal(before, _flat(fresh.parameters()))
            and all(float(s["step"]) == 0.0 for s in fresh_opt.state.values())
            and len(fresh_opt.state) > 0
        )
        state = {"model": model_sd2, "optim": optim_sd2}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        restored = torch.equal(_flat(fresh.parameters()), _flat(model.parameters()))
        _train(model, opt, range(STEPS, STEPS + 2), batch_of)
        _train(fresh, fresh_opt, range(STEPS, STEPS + 2), batch_of)
        same_state = all(
            torch.equal(opt.state[a][k], fresh_opt.state[b][k])
            for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
            for k in opt.state[a]
        )
        result[family] = {
            "zero_lr_init_is_noop": noop,
            "restored_params": restored,
            "continued_identically": torch.equal(_flat(model.parameters()), _flat(fresh.parameters())),
            "continued_state_identical": same_state,
        }
    return result


def _fsdp_model(seed: int = 0, dtype: torch.dtype = torch.float32, hsdp: bool = False) -> nn.Module:
    """The model sharded over a CPU mesh (gloo): without a mesh, FSDP2 would put it on a GPU when one exists. With
    ``hsdp``, a 2-D mesh (1 replica x all ranks): placements ``(Replicate(), Shard(0))``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = torch.distributed.get_world_size()
    mesh = (
        init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
        if hsdp
        else (init_device_mesh("cpu", (world,)))
    )
    model = _model(seed).to(dtype)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _counting_whole_steps(opt) -> list[int]:
    """Count ``opt``'s steps of unsharded tensors (a whole-tensor rule's steps of gathered FSDP2 tensors)."""
    from learned_optim.packing import is_dtensor

    count, update_tensor = [0], opt._update_tensor

    def counted(p, *args, **kwargs):
        count[0] += not is_dtensor(p)
        return update_tensor(p, *args, **kwargs)

    opt._update_tensor = counted
    return count


def _same_as_unsharded_steps(
    family: str,
    config: dict,
    batch_of,
    dtype: torch.dtype = torch.float32,
    sharded_step: str = "owner",
    hsdp: bool = False,
    counts: list[int] | None = None,
) -> bool:
    """FSDP2 steps of ``family`` (parameters in ``dtype``) against one process stepping the whole model with the same
    (gathered) gradients, each tensor in one net call (``chunk_size=None``): bit for bit after every step? ``counts``
    gets the number of whole tensors this rank stepped."""
    from learned_optim import LearnedOptimizer

    model, twin = _fsdp_model(dtype=dtype, hsdp=hsdp), _model().to(dtype)
    opt = LearnedOptimizer(model.parameters(), _rule(family, **config), sharded_step=sharded_step)
    whole_steps = _counting_whole_steps(opt)
    twin_opt = LearnedOptimizer(twin.parameters(), _rule(family, **config), chunk_size=None)
    same = True
    for t in range(STEPS):
        x, y = (v.to(dtype) for v in batch_of(t))
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for sharded, whole in zip(model.parameters(), twin.parameters(), strict=True):
            whole.grad = sharded.grad.full_tensor().clone()
        opt.step()
        twin_opt.step()
        same &= all(torch.equal(a.full_tensor(), b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    if counts is not None:
        counts.append(whole_steps[0])
    return same


def scenario_fsdp2(rank: int, world: int, out: Path) -> dict:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return {"supported": False, "reason": f"torch.distributed.fsdp.fully_shard not available: {err}"}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    from learned_optim import LearnedOptimizer

    batch_of = lambda t: _local_batch(t, rank, world)  # noqa: E731
    result: dict = {"supported": True}
    for case, (family, config) in FSDP_CASES.items():
        rule = _rule(family, **config)
        model = _fsdp_model()
        opt = LearnedOptimizer(model.parameters(), rule, nonfinite="skip")
        _train(model, opt, range(STEPS), batch_of)
        full = torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()])
        reference = _single_process(family, **config)
        moved = _max_diff(reference, _flat(_model().parameters()))
        local_sizes = [p.to_local().numel() for p in model.parameters()]
        state_is_dtensor = all(isinstance(v, DTensor) for s in opt.state.values() for k, v in s.items() if k != "step")
        # a NaN in one rank's shard only: both ranks skip the step
        x, y = batch_of(STEPS)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        first = next(iter(model.parameters()))
        if rank == world - 1:
            first.grad.to_local().view(-1)[0] = float("nan")
        opt.step()
        unchanged = torch.equal(torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()]), full)
        # checkpoint round trip with sharded (DTensor) state
        model_sd, optim_sd = get_state_dict(model, opt)
        path = out / f"fsdp-dcp-{family}"
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        fresh = _fsdp_model(seed=7)
        fresh_opt = LearnedOptimizer(fresh.parameters(), rule)
        model_sd2, optim_sd2 = get_state_dict(fresh, fresh_opt)
        state = {"model": model_sd2, "optim": optim_sd2}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _train(model, opt, range(STEPS + 1, STEPS + 3), batch_of)
        _train(fresh, fresh_opt, range(STEPS + 1, STEPS + 3), batch_of)
        result[case] = {
            "max_diff_vs_single_process": _max_diff(full, reference),
            "moved": moved,
            "local_numels": local_sizes,
            "state_is_dtensor": state_is_dtensor,
            "nan_on_one_rank_skipped": unchanged and opt.skipped_steps == 1,
            "dcp_continued_identically": all(
                torch.equal(a.to_local(), b.to_local())
                for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
            ),
        }
        if family in WHOLE_TENSOR_FAMILIES:  # each sharded step against one process's, and who computed it
            owner_steps: list[int] = []
            every_rank_steps: list[int] = []
            hsdp_steps: list[int] = []
            result[case] |= {
                "same_as_unsharded_steps": _same_as_unsharded_steps(family, config, batch_of, counts=owner_steps),
                "same_as_unsharded_steps_bf16_params": _same_as_unsharded_steps(
                    family, config, batch_of, torch.bfloat16
                ),
                "same_as_unsharded_steps_hsdp": _same_as_unsharded_steps(
                    family, config, batch_of, hsdp=True, counts=hsdp_steps
                ),
                "same_as_unsharded_steps_every_rank": _same_as_unsharded_steps(
                    family, config, batch_of, sharded_step="every_rank", counts=every_rank_steps
                ),
                "whole_steps_by_owner": owner_steps[0],
                "whole_steps_every_rank": every_rank_steps[0],
                "whole_steps_hsdp": hsdp_steps[0],
                "num_tensors": len(local_sizes),
            }
    return result


def scenario_dtensor_placements(rank: int, world: int, out: Path) -> dict:
    """The flagship's whole-tensor step of DTensor parameters sharded along dim 1 (stepped by their owners) and of one
    whose gradient is replicated (left to every rank), against one process stepping the same tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from learned_optim import LearnedOptimizer

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 9), (6, 5), (3, 1), (2, 2)]  # (3, 1) along dim 1: one rank holds all of it, the other nothing
    values = [torch.randn(shape, generator=gen) for shape in shapes]
    grads = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(STEPS)]
    grad_placements = [[Shard(1)], [Shard(1)], [Shard(1)], [Replicate()]]  # the last: not the parameter's
    params = [nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(1)])) for v in values]
    twins = [nn.Parameter(v.clone()) for v in values]
    opt = LearnedOptimizer(params, _rule("adafac_mlp", newton_schulz_steps=3))
    whole_steps = _counting_whole_steps(opt)
    twin_opt = LearnedOptimizer(twins, _rule("adafac_mlp", newton_schulz_steps=3), chunk_size=None)
    for step_grads in grads:
        for p, twin, g, placement in zip(params, twins, step_grads, grad_placements, strict=True):
            p.grad, twin.grad = distribute_tensor(g, mesh, placement), g.clone()
        opt.step()
        twin_opt.step()
    return {
        "same_as_unsharded_steps": all(
            torch.equal(p.full_tensor(), twin) for p, twin in zip(params, twins, strict=True)
        ),
        "moved": max(_max_diff(twin, v) for twin, v in zip(twins, values, strict=True)),
        "whole_steps": whole_steps[0],
    }


def scenario_meta(rank: int, world: int, out: Path) -> dict:
    """Data-parallel meta-training through the CLI (``python -m learned_optim.meta train``) in this torchrun launch."""
    import contextlib
    import io

    from learned_optim.meta.cli import main as cli

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli(
            [
                "train",
                "smoke",
                "--out",
                str(out / "meta-dp"),
                "--no-progress",
                *[a for o in META_OVERRIDES for a in ("--set", o)],
            ]
        )
    return {"exit_code": code, "stdout": stdout.getvalue()}


def scenario_meta_resume(rank: int, world: int, out: Path) -> dict:
    """Data-parallel meta-training killed while the ranks wrote a checkpoint (rank 1 has not written step 2, rank 0
    has), resumed: every rank goes back to step 1, the newest step both have, and the run ends as an uninterrupted one
    (the same weights bit for bit). Before, each rank resumed from its own newest checkpoint, out of step."""
    import torch.distributed as dist

    from learned_optim.meta.cli import resolve_config_path
    from learned_optim.meta.config import load_config
    from learned_optim.meta.trainer import MetaTrainer

    overrides = [o for o in META_OVERRIDES if not o.startswith(("meta_epochs", "checkpoint_every"))]
    result = {}
    for name, extra in (("plain", []), ("instances", TBPTT_INSTANCES)):
        config = load_config(resolve_config_path("smoke"), [*overrides, "meta_epochs=3", "checkpoint_every=1", *extra])
        full = MetaTrainer(config, out_dir=out / f"meta-full-{name}", progress=False)
        full.train()
        cut = out / f"meta-cut-{name}"
        assert MetaTrainer(config, out_dir=cut, progress=False).train(stop_after=2) is None
        mine = cut / "checkpoint" / ("" if rank == 0 else f"rank{rank}")
        kept = sorted(p.name for p in mine.glob("state-*.json"))
        if rank == 1:  # killed before its step-2 checkpoint was complete
            (mine / "state-000000002.json").unlink()
        dist.barrier()
        resumed = MetaTrainer(config, out_dir=cut, progress=False)
        resumed.train(resume=True)
        same = all(
            torch.equal(a, b)
            for a, b in zip(full.rule.state_dict().values(), resumed.rule.state_dict().values(), strict=True)
        )
        result[name] = {"kept": kept, "same_as_uninterrupted": same, "meta_steps": resumed.meta_steps}
    return result


def scenario_meta_particles(rank: int, world: int, out: Path) -> dict:
    """Particle-parallel PES through the CLI, and the same run interrupted after meta-step 3 and resumed
    particle-parallel (a copy of the interrupted run is left for a one-process resume on the pytest side)."""
    import contextlib
    import io
    import shutil

    import torch.distributed as dist

    from learned_optim.meta.cli import main as cli
    from learned_optim.meta.cli import resolve_config_path
    from learned_optim.meta.config import load_config
    from learned_optim.meta.trainer import MetaTrainer

    sets = [a for o in PES_OVERRIDES for a in ("--set", o)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli(
            ["train", "smoke", "--out", str(out / "pes-particles"), "--no-progress", "--parallel", "particles", *sets]
        )
    config = load_config(resolve_config_path("smoke"), PES_OVERRIDES)
    cut = out / "pes-particles-cut"
    first = MetaTrainer(config, out_dir=cut, progress=False, parallel="particles")
    assert first.pes is not None
    bounds = first.pes.bounds[rank]
    assert first.train(stop_after=3) is None
    dist.barrier()
    if rank == 0:
        shutil.copytree(cut, out / "pes-particles-cut-copy")
    dist.barrier()
    resumed = MetaTrainer(config, out_dir=cut, progress=False, parallel="particles")
    resumed.train(resume=True)
    batched = [a for o in BATCHED_PES for a in ("--set", o)]
    with contextlib.redirect_stdout(io.StringIO()):
        batched_code = cli(
            ["train", "smoke", "--out", str(out / "pes-particles-batched"), "--no-progress", "--parallel", "particles"]
            + sets
            + batched
        )
    return {
        "exit_code": code,
        "batched_exit_code": batched_code,
        "stdout": stdout.getvalue(),
        "particles": list(bounds),
        "meta_steps": resumed.meta_steps,
    }


SCENARIOS = {
    "ddp": scenario_ddp,
    "zero": scenario_zero,
    "dcp": scenario_dcp,
    "fsdp2": scenario_fsdp2,
    "dtensor_placements": scenario_dtensor_placements,
    "meta": scenario_meta,
    "meta_resume": scenario_meta_resume,
    "meta_particles": scenario_meta_particles,
}


def main(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    results = {"world_size": world, "torch": torch.__version__}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = {"ok": True, **scenario(rank, world, out)}
        except Exception:  # recorded and asserted on by the pytest side
            results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


# ====================================================================================== pytest side
@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        res["out_dir"] = str(out)
    return results


def _scenario(results: list[dict], name: str) -> list[dict]:
    for r, res in enumerate(results):
        assert res[name]["ok"], f"rank {r}, scenario {name}:\n{res[name]['error']}"
    return [res[name] for res in results]


@pytest.mark.parametrize("family", FAMILIES)
def test_ddp_gives_the_single_process_parameters(torchrun_results, family):
    for res in _scenario(torchrun_results, "ddp"):
        r = res[family]
        assert r["identical_across_ranks"]
        assert r["moved"] > 1e-4  # the steps did something
        assert r["max_diff_vs_single_process"] <= 1e-6 * max(1.0, r["max_abs_param"]), r


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_redundancy_optimizer(torchrun_results, family):
    ranks = _scenario(torchrun_results, "zero")
    for res in ranks:
        r = res[family]
        if family in WHOLE_TENSOR_FAMILIES:
            # each rank packs only the tensors it owns, and adafac_mlp's packed step equals its per-tensor
            # step to float rounding (tests/core/test_packed_step.py), not bit for bit: same bound here
            assert r["max_diff_vs_unsharded_per_rms_move"] <= 2e-3, r
        else:
            assert r["identical_to_unsharded"], r
        assert r["identical_across_ranks"] and r["resume_identical"], r
    assert all(res[family]["params_owned_by_rank"] > 0 for res in ranks)  # really partitioned


@pytest.mark.parametrize("family", FAMILIES)
def test_distributed_checkpoint_round_trip(torchrun_results, family):
    for res in _scenario(torchrun_results, "dcp"):
        r = res[family]
        assert r["zero_lr_init_is_noop"], "get_state_dict's zero-lr state-creation step changed something"
        assert r["restored_params"] and r["continued_identically"] and r["continued_state_identical"], r


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp2_fully_shard(torchrun_results, case):
    """Every family steps FSDP2 shards as one process steps the whole model (an empty shard included), keeps DTensor
    state that DCP round-trips, and skips a step whose NaN is on one rank's shard only. The whole-tensor rule's
    sharded step is its one-shot step on the gathered tensor: with the same gradients, one process's one-shot step
    (``chunk_size=None``) bit for bit, with float32 and with bfloat16 parameters; against a single-process run, which
    sees the full batch's gradient (not the average of the shards', another rounding) and takes the packed path
    (tests/core/test_packed_step.py), to float rounding, far below the steps' size."""
    ranks = _scenario(torchrun_results, "fsdp2")
    if not ranks[0]["supported"]:
        pytest.skip(ranks[0]["reason"])
    for res in ranks:
        r = res[case]
        assert r["state_is_dtensor"] and r["nan_on_one_rank_skipped"] and r["dcp_continued_identically"], r
        assert r["moved"] > 1e-4, r  # the steps did something
        if FSDP_CASES[case][0] in WHOLE_TENSOR_FAMILIES:
            assert r["same_as_unsharded_steps"] and r["same_as_unsharded_steps_bf16_params"], r
            assert r["same_as_unsharded_steps_hsdp"] and r["same_as_unsharded_steps_every_rank"], r
            assert r["max_diff_vs_single_process"] <= 1e-4 * r["moved"], r
            # every rank stepped every tensor whole, or each tensor was stepped by one rank, the ranks sharing them
            assert r["whole_steps_every_rank"] == STEPS * r["num_tensors"], r
            assert 0 < r["whole_steps_by_owner"] < r["whole_steps_every_rank"], r
            assert r["whole_steps_hsdp"] == r["whole_steps_by_owner"], r  # (HSDP: shared over the shard dim)
        else:
            assert r["max_diff_vs_single_process"] <= 1e-6, r
    if FSDP_CASES[case][0] in WHOLE_TENSOR_FAMILIES:
        assert sum(res[case]["whole_steps_by_owner"] for res in ranks) == STEPS * ranks[0][case]["num_tensors"]
    assert 0 in ranks[1][case]["local_numels"]  # an empty shard was exercised


def test_owner_steps_shards_of_any_dim_and_leaves_other_layouts_to_every_rank(torchrun_results):
    """DTensor parameters sharded along dim 1 (one of them wholly on one rank) are stepped by their owners, one whose
    gradient is replicated by every rank: all as one process steps them, bit for bit."""
    ranks = _scenario(torchrun_results, "dtensor_placements")
    for r in ranks:
        assert r["same_as_unsharded_steps"] and r["moved"] > 1e-4, r
    # three tensors stepped by one rank each, the fourth by both ranks, at every step
    assert sum(r["whole_steps"] for r in ranks) == STEPS * (3 + len(ranks)), ranks
    assert all(STEPS < r["whole_steps"] < 4 * STEPS for r in ranks), ranks


# ------------------------------------------------------------------------------ data-parallel meta-training
def _net_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_data_parallel_meta_training_matches_one_process_with_the_same_tasks(torchrun_results, tmp_path):
    """The meta-training CLI under torchrun (2 ranks) averages the two ranks' meta-gradients: the same as
    one process computing both tasks' meta-gradients (ranks simulated with ``rank=``, ``world_size=``)."""
    from learned_optim.meta.cli import resolve_config_path
    from learned_optim.meta.config import load_config
    from learned_optim.meta.trainer import MetaTrainer

    ranks = _scenario(torchrun_results, "meta")
    assert all(r["exit_code"] == 0 for r in ranks), ranks
    assert "on 2 processes" in ranks[0]["stdout"] and not ranks[1]["stdout"]  # rank 0 reports
    out = Path(torchrun_results[0]["out_dir"]) / "meta-dp"
    assert (out / "model" / "model.safetensors").is_file()

    def final_net(folder: Path) -> dict[str, torch.Tensor]:  # the net's weights in a rank's final checkpoint
        tensors = _net_weights(next(folder.glob("state-*.safetensors")))
        return {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}

    shipped, rank1 = final_net(out / "checkpoint"), final_net(out / "checkpoint" / "rank1")
    # every rank ends with the same weights
    assert rank1.keys() == shipped.keys() and all(torch.equal(rank1[k], shipped[k]) for k in shipped)
    assert all(v.dtype == torch.float64 for v in shipped.values())
    assert (out / "log.rank1.jsonl").is_file()

    config = load_config(resolve_config_path("smoke"), META_OVERRIDES)
    start, after = None, []
    for rank in range(2):
        trainer = MetaTrainer(config, out_dir=tmp_path / f"single{rank}", progress=False, rank=rank, world_size=2)
        start = {k: v.detach().clone() for k, v in trainer.rule.state_dict().items()}
        trainer.step()
        after.append(trainer.rule.state_dict())
    worst = 0.0
    for k in shipped:
        grad_dp = (start[k] - shipped[k]) / META_LR
        grad_single = (start[k] - (after[0][k] + after[1][k]) / 2) / META_LR
        assert grad_single.abs().max() > 0 or k.endswith("bias")
        worst = max(worst, float((grad_dp - grad_single).abs().max() / (grad_single.abs().max() + 1e-12)))
    assert worst < 1e-9, worst  # float64: only the order of the two-rank sum differs
    # and the two tasks really differ (the average is not just one rank's gradient)
    assert any(not torch.allclose(after[0][k], after[1][k]) for k in shipped)


if __name__ == "__main__":
    main(sys.argv[1])


def test_data_parallel_meta_training_resumes_every_rank_from_a_common_step(torchrun_results):
    """Each rank keeps its last two checkpoints, and a resume takes every rank back to the newest meta-step all of
    them have: a kill that left the ranks' newest checkpoints at different steps resumes as the uninterrupted run,
    also with truncated BPTT over two task instances per rank (their trajectories and streams in each rank's
    checkpoint)."""
    for ranks in _scenario(torchrun_results, "meta_resume"):
        for res in (ranks["plain"], ranks["instances"]):
            assert res["kept"] == ["state-000000001.json", "state-000000002.json"]
            assert res["same_as_uninterrupted"] and res["meta_steps"] == 3


def test_particle_parallel_pes_is_the_single_process_run_bit_for_bit(torchrun_results, tmp_path):
    """``--parallel particles`` on 2 ranks (each unrolling 2 of the 4 particles) ships the weights and logs the
    meta-steps of one process running all 4, bit for bit; whole, interrupted mid-trajectory and resumed on the 2
    ranks, or resumed on one process from the same checkpoint. Rank 1 writes no log and no checkpoint of its own."""
    import shutil

    from learned_optim.meta.cli import resolve_config_path
    from learned_optim.meta.config import load_config
    from learned_optim.meta.trainer import MetaTrainer

    ranks = _scenario(torchrun_results, "meta_particles")
    assert all(r["exit_code"] == 0 for r in ranks), ranks
    assert [r["particles"] for r in ranks] == [[0, 2], [2, 4]]  # really split
    assert "on 2 processes" in ranks[0]["stdout"] and not ranks[1]["stdout"]
    assert all(r["meta_steps"] == 6 for r in ranks)
    out = Path(torchrun_results[0]["out_dir"])
    config = load_config(resolve_config_path("smoke"), PES_OVERRIDES)
    single = MetaTrainer(config, out_dir=tmp_path / "single", progress=False)
    single.train()
    expected = _net_weights(tmp_path / "single" / "model" / "model.safetensors")
    copy = tmp_path / "cut-copy"
    shutil.copytree(out / "pes-particles-cut-copy", copy)
    assert MetaTrainer(config, out_dir=copy, progress=False).train(resume=True) is not None  # one process resumes
    initial = MetaTrainer(config, out_dir=tmp_path / "init", progress=False).rule.state_dict()
    assert any(not torch.equal(initial[k], expected[k]) for k in expected)  # the meta-steps moved the net

    def steps(run: Path) -> list[dict]:
        records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records if r["event"] == "meta_step"]

    for run in (out / "pes-particles", out / "pes-particles-cut", copy):
        got = _net_weights(run / "model" / "model.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected), run
        assert steps(run) == steps(tmp_path / "single"), run
        assert not (run / "log.rank1.jsonl").exists() and not (run / "checkpoint" / "rank1").exists()
    assert all("pes_loss_plus" in r for r in steps(tmp_path / "single"))
    # each rank unrolls its 4 particles (2 task instances) together: the one-process batched run to float rounding
    assert all(r["batched_exit_code"] == 0 for r in ranks)
    batched = load_config(resolve_config_path("smoke"), [*PES_OVERRIDES, *BATCHED_PES])
    MetaTrainer(batched, out_dir=tmp_path / "batched", progress=False).train()
    expected = _net_weights(tmp_path / "batched" / "model" / "model.safetensors")
    got = _net_weights(out / "pes-particles-batched" / "model" / "model.safetensors")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-9)
    for a, b in zip(steps(out / "pes-particles-batched"), steps(tmp_path / "batched"), strict=True):
        assert a["pes_loss_plus"] == pytest.approx(b["pes_loss_plus"], rel=1e-6)
