"""``learned_optim.adapt``: it changes the optimizer's net but not the user's model, mirrors the
optimizer's own step, rolls back on failure, raises clear errors and is recorded by save_pretrained."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import learned_optim
from learned_optim import AdaptationError, LearnedOptimizer, RNNProp
from learned_optim.adapt import adapt_weights


def _setup(seed: int = 0, *, lr: float = 1.0, weight_decay: float = 0.0, n_batches: int = 12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    opt = LearnedOptimizer(model.parameters(), RNNProp(hidden_size=6), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n_batches)]
    return model, opt, batches


def _net(opt):
    return {k: v.clone() for k, v in opt.rule.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_changes_the_net_but_not_the_model_and_leaves_the_optimizer_ready():
    model, opt, batches = _setup()
    opt.zero_grad()
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    opt.step()  # existing optimizer state: adaptation starts from it
    model_before, net_before = copy.deepcopy(model.state_dict()), _net(opt)
    grads_before = [p.grad.clone() for p in model.parameters()]
    opt_state_before = copy.deepcopy(opt.state_dict())
    result = learned_optim.adapt(opt, model, F.cross_entropy, batches, steps=3, unroll=4)
    assert len(result.meta_losses) == 3 and result.batches_seen == 15  # 3 * (4 + 1), the list is cycled
    assert not _same(_net(opt), net_before)
    assert _same(model.state_dict(), model_before)  # incl. BatchNorm running stats
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before, strict=True))  # .grad untouched
    after = opt.state_dict()
    assert all(
        torch.equal(v, after["state"][i][k]) for i, st in opt_state_before["state"].items() for k, v in st.items()
    )
    assert not any(p.requires_grad for p in opt.rule.parameters())
    opt.zero_grad()
    F.cross_entropy(model(batches[1][0]), batches[1][1]).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adapt_method_and_restore_model_false_match_the_optimizer_step():
    """With one adaptation step, the unroll ran under the original net: restore_model=False leaves the
    model exactly where ``unroll`` real optimizer steps (same batches, lr, weight decay) take it."""
    model, opt, batches = _setup(lr=0.5, weight_decay=0.1)
    reference_model = copy.deepcopy(model)
    reference_opt = LearnedOptimizer(reference_model.parameters(), copy.deepcopy(opt.rule), lr=0.5, weight_decay=0.1)
    # the unroll runs the differentiable ATen path; the reference steps take the same path (native kernels
    # off): the pre-BatchNorm bias has a ~1e-9 gradient whose Adam-normalised features amplify ulp differences
    with learned_optim.kernels.enabled_as(False):
        for x, y in batches[:5]:
            reference_opt.zero_grad()
            F.cross_entropy(reference_model(x), y).backward()
            reference_opt.step()
    opt.adapt(model, F.cross_entropy, batches, steps=1, unroll=5, restore_model=False)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    for name, b in model.named_buffers():  # BatchNorm too: the meta-loss's last forward leaves them as they were
        torch.testing.assert_close(b, dict(reference_model.named_buffers())[name])
    p0 = next(model.parameters())
    assert float(opt.state[p0]["step"]) == 5
    torch.testing.assert_close(
        opt.state[p0]["lstm"], reference_opt.state[next(reference_model.parameters())]["lstm"], rtol=1e-5, atol=1e-6
    )


def test_adapt_unrolls_at_the_lr_ratio_the_optimizer_steps_at():
    """A net with ``lr_ratio_input`` is adapted where its param group's schedule stands (lr / peak lr, here 0.25):
    restore_model=False leaves the model where the optimizer's own steps at that ratio take it, not where steps at
    ratio 1 (a group that never saw a higher lr) do."""
    torch.manual_seed(0)
    rule = learned_optim.AdafacMLP(lr_ratio_input=True, hidden_size=4).requires_grad_(False)
    for weight in rule.parameters():
        weight.normal_(0.0, 0.5)
    _, _, batches = _setup()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))  # no BatchNorm: its bias's ~1e-9 gradient
    ends = {}  # is noise that the per-tensor normalised features amplify, whatever the ratio
    for peak in (0.04, None):
        reference_model = copy.deepcopy(model)
        reference_opt = LearnedOptimizer(reference_model.parameters(), copy.deepcopy(rule), lr=0.01)
        if peak is not None:
            reference_opt.param_groups[0]["peak_lr"] = peak
        with learned_optim.kernels.enabled_as(False):
            for x, y in batches[:3]:
                reference_opt.zero_grad()
                F.cross_entropy(reference_model(x), y).backward()
                reference_opt.step()
        ends[peak] = [p.detach().clone() for p in reference_model.parameters()]
    opt = LearnedOptimizer(model.parameters(), copy.deepcopy(rule), lr=0.01)
    opt.param_groups[0]["peak_lr"] = 0.04
    opt.adapt(model, F.cross_entropy, batches, steps=1, unroll=3, restore_model=False)
    for p, q in zip(model.parameters(), ends[0.04], strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(q, r) for q, r in zip(ends[0.04], ends[None], strict=True))


def test_errors_leave_everything_unchanged():
    model, opt, batches = _setup()
    net, state = _net(opt), copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        learned_optim.adapt(opt, model, lambda out, y: (y.float() ** 2).mean(), batches)
    with pytest.raises(ValueError, match="does not depend on the parameters"):
        learned_optim.adapt(opt, model, lambda out, y: F.cross_entropy(out.detach(), y), batches)
    with pytest.raises(ValueError, match="empty"):
        learned_optim.adapt(opt, model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="ran out after 7 batches"):
        learned_optim.adapt(opt, model, F.cross_entropy, iter(batches[:7]), steps=2, unroll=4)
    with pytest.raises(TypeError, match="pair"):
        learned_optim.adapt(opt, model, F.cross_entropy, [batches[0][0]])
    with pytest.raises(TypeError, match="LearnedOptimizer"):
        learned_optim.adapt(torch.optim.Adam(model.parameters()), model, F.cross_entropy, batches)
    with pytest.raises(ValueError, match="none of the model"):
        learned_optim.adapt(opt, nn.Linear(4, 3), F.cross_entropy, batches)
    assert _same(_net(opt), net) and _same(model.state_dict(), state)
    assert opt.rule.provenance.adaptations == []  # nothing recorded by a failed adaptation


def test_non_finite_meta_gradient_rolls_back_the_whole_adaptation():
    model, opt, batches = _setup()
    net, state = _net(opt), copy.deepcopy(model.state_dict())
    calls = {"n": 0}

    def flaky(out, y):  # fine for two adaptation steps (2 * 5 calls), then NaN
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] > 10 else loss

    with pytest.raises(AdaptationError, match="step 3 of 4.*rolled back"):
        learned_optim.adapt(opt, model, flaky, batches, steps=4, unroll=4)
    assert _same(_net(opt), net) and _same(model.state_dict(), state)
    calls["n"] = 0
    with pytest.raises(AdaptationError, match="step 3 of 4"):  # nor is the model moved when asked to
        learned_optim.adapt(opt, model, flaky, batches, steps=4, unroll=4, restore_model=False)
    assert _same(_net(opt), net) and _same(model.state_dict(), state) and not opt.state
    calls["n"] = 0
    result = learned_optim.adapt(opt, model, flaky, batches, steps=4, unroll=4, nonfinite="skip")
    assert result.skipped_steps == 2 and not _same(_net(opt), net)


def test_finite_meta_loss_with_non_finite_meta_gradient_rolls_back():
    """The gradient check, not only the loss check: sqrt(|w - w0|) is 0 at w0 but its gradient is not finite."""
    rule = RNNProp(hidden_size=3)
    before = {k: v.clone() for k, v in rule.state_dict().items()}

    def segment_loss(weights, k):
        loss = sum(w.square().sum() for w in weights.values())
        if k == 1:
            w = next(iter(weights.values()))
            loss = loss + (w - w.detach()).abs().sqrt().sum()
        return loss

    with pytest.raises(AdaptationError, match="step 2 of 3: the meta-gradient norm is nan.*rolled back"):
        adapt_weights(rule, segment_loss, steps=3)
    assert _same(dict(rule.state_dict()), before)
    skipped = []
    losses = adapt_weights(rule, segment_loss, steps=3, nonfinite="skip", skipped=skipped)
    assert skipped == [1] and math.isnan(losses[1]) and math.isfinite(losses[2])
    assert not _same(dict(rule.state_dict()), before)


def test_adapt_weights_commits_only_after_every_step():
    rule = RNNProp(hidden_size=3)
    before = _net(type("O", (), {"rule": rule}))

    def segment_loss(weights, k):
        loss = sum(w.square().sum() for w in weights.values())
        return loss if k < 2 else loss + float("inf") * next(iter(weights.values())).sum()

    with pytest.raises(AdaptationError):
        adapt_weights(rule, segment_loss, steps=3)
    assert _same(dict(rule.state_dict()), before)
    adapt_weights(rule, segment_loss, steps=2)
    assert not _same(dict(rule.state_dict()), before)


def test_save_pretrained_records_the_adaptation(tmp_path):
    model, opt, batches = _setup()
    opt.adapt(model, F.cross_entropy, batches, steps=2, unroll=3, description="toy data")
    opt.save_pretrained(str(tmp_path / "adapted"), name="adapted", training={"tasks": "digits"})
    config = json.loads((tmp_path / "adapted" / "config.json").read_text())
    (record,) = config["training"]["adaptation"]
    assert config["training"]["tasks"] == "digits"
    assert record["model"] == "Sequential" and record["steps"] == 2 and record["unroll"] == 3
    assert record["description"] == "toy data" and record["loss_fn"] == "cross_entropy"
    assert record["example_batch"][0] == {"shape": [16, 4], "dtype": "float32"}
    assert "adaptation" in (tmp_path / "adapted" / "README.md").read_text()
    rule, _ = learned_optim.load_rule(tmp_path / "adapted")
    assert _same(dict(rule.state_dict()), _net(opt))


def test_save_pretrained_after_adapting_a_pretrained_net_records_its_parent(tmp_path):
    """from_pretrained -> adapt -> save_pretrained keeps the parent's name, defaults and provenance, and a
    second generation chains; the parent's results are not passed off as the adapted net's."""
    model, opt, batches = _setup()
    learned_optim.save_pretrained(
        opt.rule,
        tmp_path / "parent",
        name="toy-l2o",
        description="a toy net",
        training={"tasks": "toy", "results": {"toy": {"final_loss": 0.1}}},
        optimizer_defaults={"lr": 0.5},
    )
    opt = learned_optim.from_pretrained(tmp_path / "parent", model.parameters(), lr=0.25, weight_decay=0.01)
    model_before = copy.deepcopy(model.state_dict())
    opt.save_pretrained(str(tmp_path / "unadapted"))
    unadapted = json.loads((tmp_path / "unadapted" / "config.json").read_text())
    assert unadapted["name"] == "toy-l2o" and unadapted["description"] == "a toy net"
    assert unadapted["optimizer"] == {"lr": 0.5} and "adaptation" not in unadapted["training"]
    assert unadapted["training"]["parent"]["source"] == str(tmp_path / "parent")

    opt.adapt(model, F.cross_entropy, batches, steps=2, unroll=3, description="toy batches")
    assert _same(model.state_dict(), model_before)
    opt.save_pretrained(str(tmp_path / "adapted"))
    config = json.loads((tmp_path / "adapted" / "config.json").read_text())
    assert config["name"] == "toy-l2o-adapted"
    assert "toy-l2o adapted" in config["description"] and "toy batches" in config["description"]
    assert config["optimizer"] == {"lr": 0.25}  # the lr the net was adapted at
    (record,) = config["training"]["adaptation"]
    assert record["optimizer_lr"] == 0.25 and record["optimizer_weight_decay"] == 0.01
    parent = config["training"]["parent"]
    assert parent["name"] == "toy-l2o" and parent["source"] == str(tmp_path / "parent")
    assert parent["training"]["results"] == {"toy": {"final_loss": 0.1}} and "results" not in config["training"]
    card = (tmp_path / "adapted" / "README.md").read_text()
    assert "## Adaptation" in card and "Adapted from `toy-l2o`" in card and "toy batches" in card
    assert "cross_entropy" in card

    model2, _, batches2 = _setup(seed=3)
    opt2 = learned_optim.from_pretrained(tmp_path / "adapted", model2.parameters())
    assert opt2.defaults["lr"] == 0.25
    opt2.adapt(model2, F.cross_entropy, batches2, steps=1, unroll=2)
    opt2.save_pretrained(str(tmp_path / "adapted2"), name="mine")
    second = json.loads((tmp_path / "adapted2" / "config.json").read_text())
    assert second["name"] == "mine" and len(second["training"]["adaptation"]) == 1
    assert second["training"]["parent"]["name"] == "toy-l2o-adapted"
    assert second["training"]["parent"]["training"]["parent"]["name"] == "toy-l2o"
    second_card = (tmp_path / "adapted2" / "README.md").read_text()
    assert second_card.count("Adapted from") == 2 and "Adapted from `toy-l2o-adapted`" in second_card
    # an adapted checkpoint loaded and saved again keeps its adaptations in the card
    learned_optim.from_pretrained(tmp_path / "adapted", model2.parameters()).save_pretrained(tmp_path / "again")
    again_card = (tmp_path / "again" / "README.md").read_text()
    assert "## Adaptation" in again_card and "Saved again from `toy-l2o-adapted`" in again_card
    assert "Adapted from `toy-l2o`" in again_card and "toy batches" in again_card
    assert "under `training.parent.training.parent`" in again_card


def test_restore_model_false_leaves_batchnorm_one_update_per_optimizer_step():
    """The meta-objective's last loss of each unroll is no training step: with restore_model=False the model's
    BatchNorm has seen one batch per unrolled optimizer step, as training it with the optimizer would."""
    model, opt, batches = _setup()
    bn = model[1]
    assert int(bn.num_batches_tracked) == 0
    opt.adapt(model, F.cross_entropy, batches, steps=2, unroll=3, restore_model=False)
    assert int(bn.num_batches_tracked) == 6 and all(int(opt.state[p]["step"]) == 6 for p in model.parameters())


def test_a_skipped_unroll_is_followed_by_one_from_the_last_finite_end_point():
    """With ``chain`` and ``nonfinite="skip"``, an unroll that ends at non-finite weights is skipped and the next
    starts where the last finite one ended (not from the model's weights); a log objective whose first loss is not
    finite is a non-finite meta-loss like any other (skipped, or an AdaptationError), not a ValueError."""
    model, opt, batches = _setup()
    same = [batches[0]] * 4  # every unroll's first loss then depends on its starting weights only
    first_losses, calls = [], {"n": 0}

    def nan_in_the_second_unroll(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        if calls["n"] % 4 == 1:
            first_losses.append(float(loss))
        return loss * float("nan") if calls["n"] == 6 else loss

    result = opt.adapt(model, nan_in_the_second_unroll, same, steps=3, unroll=3, nonfinite="skip")
    assert result.skipped_steps == 1 and len(first_losses) == 3
    assert first_losses[2] == first_losses[1] != first_losses[0]  # the third starts where the first ended

    def nan_first(out, y):  # f_0, the log objective's reference, is NaN; every later loss is finite
        calls["n"] += 1
        return F.cross_entropy(out, y) * (float("nan") if calls["n"] == 1 else 1.0)

    for nonfinite, error in (("skip", "every one of the 2 adaptation steps was skipped"), ("raise", "step 1 of 2")):
        calls["n"] = 0
        with pytest.raises(AdaptationError, match=error):
            opt.adapt(model, nan_first, batches, steps=2, unroll=3, objective="log", nonfinite=nonfinite)


@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer step here
def test_nothing_to_adapt_is_an_error_not_a_recorded_adaptation(tmp_path):
    """At lr 0 (the first step of a warm-up from 0) every unrolled step is a no-op, and with every step skipped as
    non-finite nothing changed: both raise AdaptationError, record nothing and leave the net as it was."""
    model, opt, batches = _setup()
    net = _net(opt)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)  # lr 0 now
    with pytest.raises(AdaptationError, match="lr is 0 for every parameter"):
        opt.adapt(model, F.cross_entropy, batches, steps=2, unroll=3)
    scheduler.step()

    def always_nan(out, y):
        return F.cross_entropy(out, y) * float("nan")

    with pytest.raises(AdaptationError, match="every one of the 2 adaptation steps was skipped"):
        opt.adapt(model, always_nan, batches, steps=2, unroll=3, nonfinite="skip")
    assert _same(_net(opt), net) and opt.rule.provenance.adaptations == []


@pytest.mark.filterwarnings("ignore:Detected call of")  # no optimizer step here
def test_an_adapted_checkpoint_keeps_the_parents_schedule_and_the_lr_that_was_set(tmp_path):
    """Saved after adapting mid warm-up, the checkpoint recommends the lr the optimizer was given (the scheduler's
    ``initial_lr``), not the warm-up's lr of the moment; it keeps the parent's schedule and research note, adapted
    or not."""
    model, opt, batches = _setup()
    learned_optim.save_pretrained(opt.rule, tmp_path / "parent", name="toy", schedule="cosine")
    config = json.loads((tmp_path / "parent" / "config.json").read_text())
    config["research"] = "a reproduction of a paper's setting"
    (tmp_path / "parent" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="research reproduction"):
        opt = learned_optim.from_pretrained(tmp_path / "parent", model.parameters(), lr=0.4)
    opt.save_pretrained(str(tmp_path / "resaved"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / 100)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.008)
    opt.adapt(model, F.cross_entropy, batches, steps=1, unroll=2)
    opt.save_pretrained(str(tmp_path / "adapted"))
    for folder in ("resaved", "adapted"):
        saved = json.loads((tmp_path / folder / "config.json").read_text())
        assert saved["schedule"] == "cosine" and saved["research"] == config["research"], folder
    adapted = json.loads((tmp_path / "adapted" / "config.json").read_text())
    (record,) = adapted["training"]["adaptation"]
    assert record["optimizer_lr"] == pytest.approx(0.008) and record["optimizer_base_lr"] == 0.4
    assert adapted["optimizer"]["lr"] == 0.4


def test_parameters_on_several_devices_are_refused_before_anything_changes():
    model, opt, batches = _setup()
    net = _net(opt)
    model.add_module("elsewhere", nn.Linear(2, 2, device="meta"))
    opt.add_param_group({"params": model.elsewhere.parameters()})
    with pytest.raises(ValueError, match="several devices"):
        learned_optim.adapt(opt, model, F.cross_entropy, batches)
    assert _same(_net(opt), net)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["rnnprop", "mlp"])
def test_adapt_on_cuda(tmp_path, family):
    """A CUDA model: from_pretrained puts the net on the GPU; a net left on the CPU is adapted through a
    GPU copy (the MLP net has a buffer) and committed back; the model is untouched and training runs."""
    torch.manual_seed(0)
    learned_optim.save_pretrained(learned_optim.FAMILIES[family](), tmp_path / "net", optimizer_defaults={"lr": 0.1})
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).cuda()
    batches = [(torch.randn(16, 4, device="cuda"), torch.randint(0, 3, (16,), device="cuda")) for _ in range(6)]
    opt = learned_optim.from_pretrained(tmp_path / "net", model.parameters())
    assert next(opt.rule.parameters()).is_cuda
    cpu_opt = LearnedOptimizer(model.parameters(), learned_optim.load_rule(tmp_path / "net")[0], lr=0.1)
    for o in (opt, cpu_opt):
        before, model_before = _net(o), copy.deepcopy(model.state_dict())
        o.adapt(model, F.cross_entropy, batches, steps=2, unroll=2)
        assert not _same(_net(o), before) and _same(model.state_dict(), model_before)
    opt.zero_grad()
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
