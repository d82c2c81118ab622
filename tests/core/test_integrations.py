"""Ecosystem integrations: timm's optimizer registry, Lightning, Transformers, and the quickstart example.

The Lightning/Transformers tests run the example scripts themselves (a few steps on CPU), so the
examples a user copies are what is tested. They are skipped when the ``integrations`` extra is not
installed.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import learned_optim
from learned_optim import LearnedOptimizer, save_pretrained
from learned_optim.integrations.timm import register_timm_optimizers

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (without running its ``__main__`` block)."""
    spec = importlib.util.spec_from_file_location(f"learned_optim_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses/pickling inside the example need a registered module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside Lightning's/Accelerate's wrappers."""
    while not isinstance(optimizer, LearnedOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


# ------------------------------------------------------------------------------------------ timm


@pytest.fixture
def restore_timm_registry():
    """Restore timm's optimizer registry to its previous content after the test."""
    timm_factory = pytest.importorskip("timm.optim._optim_factory")
    registry = timm_factory.default_registry
    before = dict(registry._optimizers)
    yield registry
    registry._optimizers.clear()
    registry._optimizers.update(before)


@pytest.fixture
def timm_registry(temp_zoo, make_rule, restore_timm_registry):
    """The temporary zoo (plus an entry whose name timm cannot take) registered with timm."""
    root, name = temp_zoo
    save_pretrained(make_rule("dm_lstm"), root / "has_underscore", name="has_underscore")
    return name, register_timm_optimizers()


def _timm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.LayerNorm(3)
    )


def test_timm_registers_zoo_entries(timm_registry):
    import timm.optim

    name, registered = timm_registry
    assert registered == [name]  # "has_underscore" is skipped: timm splits optimizer names on "_"
    assert name in timm.optim.list_optimizers()
    assert "has_underscore" not in timm.optim.list_optimizers()
    assert register_timm_optimizers() == []  # idempotent


def test_import_registers_the_zoo_with_timm(temp_zoo, restore_timm_registry):
    """``import learned_optim`` registers every zoo entry (re-run here by reloading the package)."""
    import timm.optim

    _, name = temp_zoo
    assert name not in timm.optim.list_optimizers()
    importlib.reload(learned_optim)
    assert name in timm.optim.list_optimizers()
    assert isinstance(timm.optim.create_optimizer_v2(_timm_model(), name), LearnedOptimizer)


def test_timm_create_optimizer_v2_groups_and_trains(timm_registry):
    """create_optimizer_v2 builds the learned optimizer with biases and norm params in a no-decay group."""
    import timm.optim

    name, _ = timm_registry
    model = _timm_model()
    opt = timm.optim.create_optimizer_v2(model, name, weight_decay=0.05)
    assert isinstance(opt, LearnedOptimizer) and opt.rule.family == "mlp"
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {0.0, 0.05}
    assert groups[0.05] == {id(model[0].weight), id(model[4].weight)}
    assert groups[0.0] == {
        id(p) for p in (model[0].bias, model[1].weight, model[1].bias, model[4].bias, model[5].weight, model[5].bias)
    }
    assert all(g["lr"] == 1.0 for g in opt.param_groups)  # the checkpoint's default

    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.isfinite(p).all() and not torch.equal(b, p)
        assert float(opt.state[p]["step"]) == 3.0


def test_timm_passes_lr_and_foreach(timm_registry):
    import timm.optim

    name, _ = timm_registry
    opt = timm.optim.create_optimizer_v2(_timm_model(), name, lr=0.3, weight_decay=0.0, foreach=False)
    assert isinstance(opt, LearnedOptimizer)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["foreach"] is False


# ------------------------------------------------------------------------------------------ Lightning


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
def test_lightning_example_trains(checkpoint_dir):
    pytest.importorskip("lightning")
    example = load_example("lightning_example")
    trainer, module = example.main(str(checkpoint_dir), max_steps=3)
    assert trainer.global_step == 3
    opt = _unwrap(trainer.optimizers[0])
    assert isinstance(opt, LearnedOptimizer) and opt.rule.family == "rnnprop"
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert all(float(opt.state[p]["step"]) == 3.0 for p in module.parameters())
    assert opt.param_groups[0]["lr"] < 0.5  # the cosine schedule scaled the checkpoint's lr of 0.5
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))


# ------------------------------------------------------------------------------------------ Transformers


def test_transformers_example_trains(checkpoint_dir, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = load_example("transformers_example")
    trainer = example.main(str(checkpoint_dir), max_steps=3, output_dir=str(tmp_path / "out"))
    assert trainer.state.global_step == 3
    opt = _unwrap(trainer.optimizer)
    assert isinstance(opt, LearnedOptimizer) and opt.rule.family == "rnnprop"
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]
    assert all(g["lr"] == 0.5 for g in opt.param_groups)  # checkpoint default, constant schedule
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(float(opt.state[p]["step"]) == 3.0 for p in params)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


# ------------------------------------------------------------------------------------------ quickstart


def test_quickstart_example_runs_with_the_zoo_default(capsys):
    example = load_example("quickstart")
    losses = example.main(epochs=2)
    assert len(losses) == 40 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[20:]) < sum(losses[:20])  # the zoo's flagship makes progress
    assert "resumed optimizer at step 40 of 40" in capsys.readouterr().out


def test_quickstart_example_with_a_given_checkpoint(checkpoint_dir, capsys):
    example = load_example("quickstart")
    losses = example.main(str(checkpoint_dir), epochs=1)
    assert len(losses) == 20
    assert "resumed optimizer at step 20 of 20" in capsys.readouterr().out


def test_timm_lookahead_trains_past_its_slow_update_and_resumes_bit_identically(timm_registry):
    """timm's ``lookahead_<name>`` keeps its slow weights in each parameter's state beside the net's: the step and
    ``load_state_dict`` take state with keys beyond the net's (they refused it at the 7th step and at a resume)."""
    import timm.optim

    name, _ = timm_registry
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))

    def train(opt, model, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model = _timm_model()
    opt = timm.optim.create_optimizer_v2(model, "lookahead_" + name)
    train(opt, model, 8)  # past Lookahead's slow update (every 6 steps)
    assert all("lookahead_slow_buff" in s for s in opt._base_optimizer.state.values())
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    train(opt, model, 7)
    resumed_model = _timm_model()
    resumed_model.load_state_dict(weights)
    resumed = timm.optim.create_optimizer_v2(resumed_model, "lookahead_" + name)
    resumed.load_state_dict(saved)
    train(resumed, resumed_model, 7)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_timm_lookahead_after_a_skipped_step_starts_the_nets_state_then(make_rule):
    """With ``nonfinite="skip"`` a skipped first step leaves only Lookahead's slow weights in a parameter's state:
    the next step starts the net's state beside them, and such a state dict loads (both refused it)."""
    from timm.optim.lookahead import Lookahead

    model = _timm_model()
    opt = Lookahead(LearnedOptimizer(model.parameters(), make_rule("adafac_mlp"), nonfinite="skip"), k=1)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()  # skipped by the learned optimizer; Lookahead still keeps its slow weights
    assert all(set(s) == {"lookahead_slow_buff"} for s in opt._base_optimizer.state.values())
    saved = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all({"lookahead_slow_buff", "step", "m0"} <= set(s) for s in opt._base_optimizer.state.values())
    fresh = Lookahead(LearnedOptimizer(_timm_model().parameters(), make_rule("adafac_mlp"), nonfinite="skip"), k=1)
    fresh.load_state_dict(saved)
