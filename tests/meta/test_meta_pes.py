"""PES (persistent evolution strategies): unbiasedness on a quadratic, and bit-identical resume in the trainer."""

from __future__ import annotations

import json

import pytest
import torch
from test_meta_trainer import meta_records, tiny_config, weights_of

from learned_optim.meta import pes
from learned_optim.meta.pes import pes_estimate
from learned_optim.meta.trainer import MetaTrainer
from learned_optim.meta.unroll import unroll_particles

D64 = torch.float64
CURVATURE = torch.tensor([0.2, 0.5, 1.0, 1.5, 1.9], dtype=D64)
X0 = torch.tensor([1.0, -0.5, 0.8, 0.3, -1.2], dtype=D64)
K, TRUNCATIONS = 5, 4  # a trajectory of 20 inner steps in 4 truncations


def inner_steps(theta: torch.Tensor, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` of x <- x - 0.3 exp(theta0) A x - 0.05 theta1 x on f = x^T A x / 2 (``theta``, ``x`` batched
    on the leading axis); returns the sum of the losses f(x_1..x_steps) and the new x."""
    total = x.new_zeros(x.shape[0])
    for _ in range(steps):
        x = x - 0.3 * torch.exp(theta[:, :1]) * CURVATURE * x - 0.05 * theta[:, 1:] * x
        total = total + 0.5 * (CURVATURE * x * x).sum(dim=1)
    return total, x


def true_gradient(theta: torch.Tensor) -> torch.Tensor:
    theta = theta.clone().requires_grad_(True)
    total, _ = inner_steps(theta.unsqueeze(0), X0.unsqueeze(0), K * TRUNCATIONS)
    (grad,) = torch.autograd.grad(total.sum(), theta)
    return grad


def estimates(theta: torch.Tensor, *, groups: int, pairs: int, sigma: float, persistent: bool) -> torch.Tensor:
    """``groups`` independent estimates of the full-trajectory gradient, each the sum over the truncations of
    PES's estimate with ``pairs`` pairs (``persistent=False``: xi reset every truncation = truncated ES)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(groups):
        x = X0.expand(2 * pairs, -1).clone()
        xi = torch.zeros((pairs, theta.numel()), dtype=D64)
        total = torch.zeros_like(theta)
        for _ in range(TRUNCATIONS):
            epsilon = sigma * torch.randn(xi.shape, generator=gen, dtype=D64)
            result = pes_estimate(lambda w, s: inner_steps(w, s, K), theta, x, xi, epsilon, sigma)
            x, xi = result.state, result.xi if persistent else torch.zeros_like(xi)
            total += result.gradient
        out.append(total)
    return torch.stack(out)


def test_pes_matches_the_true_meta_gradient_in_expectation():
    """The mean of 40 independent PES estimates (400 antithetic pairs each) equals the autograd gradient of
    the whole 20-step objective within 4 standard errors per coordinate (the estimates are i.i.d., so by the
    CLT a correct estimator fails this with probability ~1e-4); sigma = 1e-3 keeps the Gaussian smoothing's
    O(sigma^2) bias ~1e-6 relative, far below the standard error. Truncated ES (xi reset every truncation)
    fails the same check: its bias (it ignores the weights' effect on the state a truncation inherits) is
    many standard errors, so the check does discriminate."""
    theta = torch.tensor([0.1, 0.5], dtype=D64)
    truth = true_gradient(theta)
    pes = estimates(theta, groups=40, pairs=400, sigma=1e-3, persistent=True)
    mean, se = pes.mean(dim=0), pes.std(dim=0) / pes.shape[0] ** 0.5
    assert torch.all((mean - truth).abs() <= 4 * se), (mean, truth, se)
    assert torch.all(se < 0.05 * truth.abs())  # and the check is tight: 5% of the gradient at most
    truncated = estimates(theta, groups=40, pairs=400, sigma=1e-3, persistent=False)
    t_mean, t_se = truncated.mean(dim=0), truncated.std(dim=0) / truncated.shape[0] ** 0.5
    assert torch.any((t_mean - truth).abs() > 10 * t_se), (t_mean, truth, t_se)


def test_pes_estimate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        pes_estimate(lambda w, s: (w.sum(1), s), torch.zeros(3), None, torch.zeros(2, 3), torch.zeros(2, 4), 0.1)


def pes_config(**changes):
    base = {
        "net": {"family": "adafac_mlp", "config": {"hidden_size": 4}},
        "estimator": {"kind": "pes", "num_pairs": 2, "sigma": 0.01},
        "unroll": {
            "trajectory_length": 6,
            "segment_length": 3,
            "lr": 0.01,
            "lr_range": [0.003, 0.03],
            "weight_decays": [0.0, 0.1, 1.0],
        },
    }
    return tiny_config(**{**base, **changes})


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_pes_run_resumes_bit_for_bit(tmp_path, schedule):
    config = pes_config(unroll__schedule=schedule)
    full = MetaTrainer(config, out_dir=tmp_path / "full", progress=False)
    full_folder = full.train()
    first = MetaTrainer(config, out_dir=tmp_path / "cut", progress=False)
    assert first.train(stop_after=4) is None  # killed mid-trajectory (checkpoint at meta-step 3)
    resumed = MetaTrainer(config, out_dir=tmp_path / "cut", progress=False, command="resumed")
    cut_folder = resumed.train(resume=True)
    assert resumed.meta_steps == full.meta_steps == 8
    wf, wc = weights_of(full_folder), weights_of(cut_folder)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    records = meta_records(tmp_path / "full")
    assert records == meta_records(tmp_path / "cut")
    assert all("pes_loss_plus" in r for r in records)
    lrs = {r["meta_epoch"]: r["inner_lr"] for r in records}  # one inner lr per trajectory, kept across resume
    assert len(set(lrs.values())) == 4 and all(0.003 <= v <= 0.03 for v in lrs.values())
    decays = {r["meta_epoch"]: r["inner_weight_decay"] for r in records}  # and one weight decay
    assert len({(r["meta_epoch"], r["inner_weight_decay"]) for r in records}) == 4
    assert set(decays.values()) <= {0.0, 0.1, 1.0} and len(set(decays.values())) > 1
    assert json.loads((cut_folder / "config.json").read_text())["family"] == "adafac_mlp"
    # the meta-gradient moved the net: PES is not a no-op
    initial = MetaTrainer(pes_config(), out_dir=tmp_path / "init", progress=False).rule.state_dict()
    assert any(not torch.equal(initial[k], wf[k]) for k in wf)


def assert_batched_run_estimates_as_the_loop_and_resumes(batched, tmp_path):
    """A run of config ``batched`` (``batch_particles``) in ``tmp_path / "full"``: its first PES estimate equals that of
    the loop run already in ``tmp_path / "loop"`` to float rounding, and the same run cut after meta-step 4 and
    resumed is it bit for bit (net and log)."""
    full_folder = MetaTrainer(batched, out_dir=tmp_path / "full", progress=False).train()
    loop, together = meta_records(tmp_path / "loop")[0], meta_records(tmp_path / "full")[0]
    for key in ("pes_loss_plus", "pes_loss_minus", "pes_grad_norm"):
        assert together[key] == pytest.approx(loop[key], rel=1e-5), key
    assert MetaTrainer(batched, out_dir=tmp_path / "cut", progress=False).train(stop_after=4) is None
    cut_folder = MetaTrainer(batched, out_dir=tmp_path / "cut", progress=False).train(resume=True)
    wf, wc = weights_of(full_folder), weights_of(cut_folder)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    assert meta_records(tmp_path / "full") == meta_records(tmp_path / "cut")


def test_pes_with_batched_particles_estimates_as_the_loop_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """``estimator.batch_particles``: the particles unrolled together (vmap) give the loop's PES estimate to float
    rounding (first meta-step: objectives and gradient norm), and such a run, cut and resumed, is itself bit for bit."""
    batched = pes_config(estimator={"kind": "pes", "num_pairs": 2, "sigma": 0.01, "batch_particles": True})
    particles_per_call = []

    def counting(rule, weights, task, trajectories, *args, **kwargs):
        particles_per_call.append(len(trajectories))
        return unroll_particles(rule, weights, task, trajectories, *args, **kwargs)

    monkeypatch.setattr(pes, "unroll_particles", counting)
    MetaTrainer(pes_config(), out_dir=tmp_path / "loop", progress=False).train(stop_after=1)
    assert_batched_run_estimates_as_the_loop_and_resumes(batched, tmp_path)
    assert set(particles_per_call) == {4}  # every truncation: the 4 particles in one call


def test_batched_particles_need_pes_or_task_instances():
    with pytest.raises(ValueError, match="batch_particles batches PES particles or, with truncated BPTT, task"):
        pes_config(estimator={"kind": "tbptt", "batch_particles": True})
    with pytest.raises(ValueError, match="instances must be >= 1"):
        pes_config(estimator={"kind": "pes", "instances": 0})


def instances_config(batch_particles: bool):
    estimator = {"kind": "pes", "num_pairs": 1, "sigma": 0.01, "instances": 2, "batch_particles": batch_particles}
    return pes_config(estimator=estimator)


def test_pes_over_task_instances_spreads_the_pairs_over_starting_points_and_data(tmp_path):
    """``estimator.instances: 2`` with one pair each: 4 particles, each pair on its own task instance (its own
    theta_0 and batches), the + and - particle of a pair on the same one; one by one and batched (one call, a batch
    stream per instance) give the same estimate to rounding; a batched run resumes bit for bit, and not with another
    number of instances."""
    trainer = MetaTrainer(instances_config(False), out_dir=tmp_path / "loop", progress=False)
    assert trainer.pes is not None and trainer.pes.num_particles == 4
    assert [trainer.pes.instance_of(i) for i in range(4)] == [0, 1, 0, 1]
    trainer.train(stop_after=1)
    particles = trainer.pes.particles
    assert all(p.step == 3 for p in particles)
    theta = [torch.cat([v.reshape(-1) for v in p.params.values()]) for p in particles]
    assert not torch.allclose(theta[0], theta[1])  # two instances apart
    assert torch.allclose(theta[0], theta[2], atol=0.1) and torch.allclose(theta[1], theta[3], atol=0.1)
    assert_batched_run_estimates_as_the_loop_and_resumes(instances_config(True), tmp_path)
    one_instance = pes_config(estimator={"kind": "pes", "num_pairs": 1, "sigma": 0.01})
    with pytest.raises(ValueError, match="estimator.instances: 2 -> 1"):
        MetaTrainer(one_instance, out_dir=tmp_path / "cut", progress=False).train(resume=True)
    other = MetaTrainer(one_instance, out_dir=tmp_path / "other", progress=False).pes
    assert other is not None
    with pytest.raises(ValueError, match="holds 4 PES particles, the config makes 2"):
        other.load(*trainer.pes.to_tensors())


def test_pes_refuses_estimators_that_need_backprop():
    with pytest.raises(ValueError, match="does not combine"):
        pes_config(imitation={"enabled": True})


def test_adafac_mlp_meta_trains_with_truncated_bptt_too(tmp_path):
    """The PES-vs-TBPTT ablation runs: backprop flows through the whole-tensor rule (its per-tensor reductions)."""
    config = pes_config(estimator={"kind": "tbptt"}, meta_epochs=1)
    trainer = MetaTrainer(config, out_dir=tmp_path, progress=False)
    initial = {k: v.clone() for k, v in trainer.rule.state_dict().items()}
    trainer.train()
    steps = [r for r in meta_records(tmp_path) if r["event"] == "meta_step"]
    assert len(steps) == 2 and all(r["grad_norm"] > 0 and not r["skipped"] for r in steps)
    assert any(not torch.equal(initial[k], v) for k, v in trainer.rule.state_dict().items())


def test_particle_parallel_is_refused_where_it_cannot_be_the_single_process_run(tmp_path):
    """``parallel="particles"`` splits PES particles (the bit-for-bit comparison with one process runs in 2 ranks in
    tests/core/test_distributed.py): refused without PES, on ranks without a process group, with more ranks than
    particles; an unknown mode is refused too."""
    from learned_optim.meta.pes import PESRunner

    with pytest.raises(ValueError, match="needs estimator.kind 'pes'"):
        MetaTrainer(pes_config(estimator={"kind": "tbptt"}), out_dir=tmp_path, parallel="particles")
    with pytest.raises(ValueError, match="needs a torch.distributed process group"):
        MetaTrainer(pes_config(), out_dir=tmp_path, parallel="particles", rank=0, world_size=2)
    with pytest.raises(ValueError, match="parallel must be 'data' or 'particles'"):
        MetaTrainer(pes_config(), out_dir=tmp_path, parallel="tasks")
    trainer = MetaTrainer(pes_config(), out_dir=tmp_path, parallel="particles")  # one process: all 4 particles
    assert trainer.pes is not None and trainer.pes.bounds == [(0, 4)]
    with pytest.raises(ValueError, match="needs at least as many particles, has 4"):
        PESRunner(trainer.config, trainer.rule, device=trainer.device, dtype=trainer.dtype, rank=0, world_size=5)


def test_particle_blocks_cover_every_particle_once_as_evenly_as_possible():
    from learned_optim.meta.distributed import block_bounds

    assert block_bounds(8, 2) == [(0, 4), (4, 8)]
    assert block_bounds(6, 4) == [(0, 1), (1, 3), (3, 4), (4, 6)]
    for total, world in [(2, 2), (8, 3), (16, 5)]:
        bounds = block_bounds(total, world)
        assert [b[0] for b in bounds[1:]] == [b[1] for b in bounds[:-1]] and bounds[0][0] == 0
        assert bounds[-1][1] == total and max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1
