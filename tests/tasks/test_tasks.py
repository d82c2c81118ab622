"""Optimizee tasks: losses against hand computations, differentiability, determinism, metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp

from learned_optim.tasks import (
    PRESETS,
    TASK_FAMILIES,
    TEST_SIGMAS,
    TRAIN_SIGMAS,
    LinearRegressionTask,
    MixtureFamily,
    QuadraticTask,
    RosenbrockFamily,
    StepSizeQuadraticTask,
    Task,
    TaskFamily,
    make_family,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


#: Small, fast configurations of every family that needs no data_root.
SMALL = {
    "quadratic": {"num_instances": 4, "dim": 3},
    "lasso": {"num_instances": 4, "dim": 3},
    "rosenbrock": {"num_instances": 4},
    "least-squares": {"dim": 20, "n_train": 10, "n_val": 10, "n_test": 10},
    "cubic-regression": {"n_train": 16, "n_val": 8, "n_test": 8},
    "stepsize-quadratic": {"dim": 5},
    "mlp": {"batch_size": 8, "eval_batch_size": 16},
    "conv": {"batch_size": 4, "eval_batch_size": 8, "channels": (2, 3)},
    "resnet": {"batch_size": 4, "eval_batch_size": 8, "depth": 8, "widths": (4, 8, 8)},
    "timm": {"batch_size": 4, "eval_batch_size": 8, "image_size": 16},
    "mixture": {"batch_size": 8, "eval_batch_size": 16},
    "meta-mix": {"batch_sizes": [8], "eval_batch_size": 16, "widths": [8]},
}
NEEDS_ROOT = ("mnist-", "cifar10-")
#: Families whose theta_0 is fixed per task (gradient descent from 0, or the paper's fixed w0).
FIXED_INIT = ("least-squares", "cubic-regression", "stepsize-quadratic")
LOCAL_FAMILIES = sorted(n for n in TASK_FAMILIES if not n.startswith(NEEDS_ROOT))


#: The battery runs on every base family plus the papers' meta-training preset; the other presets
#: only change defaults and get a lighter check (test_presets).
BATTERY = sorted(n for n in LOCAL_FAMILIES if n not in PRESETS) + ["digits-mlp20-sigmoid"]


def small_family(name: str, **extra) -> TaskFamily:
    config = SMALL.get(name, {"batch_size": 4, "eval_batch_size": 8})
    return make_family(name, **{**config, **extra})


def flat(params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


# ------------------------------------------------------------------ hand computations


def test_quadratic_and_lasso_loss_by_hand():
    W = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[2.0, 0.0], [1.0, -1.0]]])
    y = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    x = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    # instance 1: Wx - y = (-1, -1) - (1, 0) = (-2, -1) -> 5; |x|_1 = 2
    # instance 2: Wx - y = (0, -2) - (0.5, 0.5) = (-0.5, -2.5) -> 6.5; |x|_1 = 2
    quad = QuadraticTask(W, y, torch.ones(2), quad_scale=1.0, l1=0.0, init_std=0.01)
    lasso = QuadraticTask(W, y, torch.ones(2), quad_scale=0.5, l1=0.005, init_std=0.01)
    batch = quad.batch("train", gen())
    assert float(quad.loss({"x": x}, batch)) == pytest.approx((5 + 6.5) / 2)
    assert float(lasso.loss({"x": x}, batch)) == pytest.approx((0.5 * 5 + 0.01 + 0.5 * 6.5 + 0.01) / 2)


def test_quadratic_family_shapes_and_sigmas():
    family = make_family("lasso")
    assert family.config["l1"] == 0.005 and family.dim == 10 and family.num_instances == 128
    task = family.sample(gen())
    assert task.W.shape == (128, 10, 10) and task.y.shape == (128, 10)
    assert float(task.y.min()) >= 0 and float(task.y.max()) <= 1
    assert float(task.sigma[0]) in TRAIN_SIGMAS and torch.all(task.sigma == task.sigma[0])
    x0 = task.init_params(gen())["x"]
    assert x0.shape == (128, 10) and float(x0.std()) == pytest.approx(0.01, rel=0.1)
    big = make_family("quadratic", sigma=50.0).sample(gen())
    assert float(big.W.std()) == pytest.approx(50.0, rel=0.05)
    mixed = make_family("quadratic", sigma=TEST_SIGMAS, sigma_per_instance=True).sample(gen())
    assert set(mixed.sigma.tolist()) == set(TEST_SIGMAS)
    assert {float(make_family("quadratic").sample(gen(s)).sigma[0]) for s in range(20)} == set(TRAIN_SIGMAS)


def test_rosenbrock_by_hand():
    task = RosenbrockFamily(num_instances=3).sample(gen())
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, 2.0]])
    # (1 - u)^2 + 100 (v - u^2)^2: 0, 1, 4 + 100
    assert float(task.loss({"x": x}, task.batch("train", gen()))) == pytest.approx((0 + 1 + 104) / 3)
    x0 = RosenbrockFamily(num_instances=4096).sample(gen()).init_params(gen())["x"]
    assert float(x0.std()) == pytest.approx(1.0, rel=0.05)


def test_linear_regression_by_hand_and_rmse():
    phi = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    y = torch.tensor([1.0, 2.0, 5.0])
    task = LinearRegressionTask({"train": (phi, y), "val": (phi, y), "test": (phi, y)})
    w = {"w": torch.tensor([1.0, 1.0])}  # residuals (0, 0, -2)
    batch = task.batch("test", gen())
    assert float(task.loss(w, batch)) == pytest.approx(4 / 6)
    assert task.metrics(w, batch)["rmse"] == pytest.approx(math.sqrt(4 / 3))
    assert torch.equal(task.init_params(gen())["w"], torch.zeros(2))


def test_least_squares_family():
    family = make_family("least-squares", dim=50, n_train=30, n_val=20, n_test=10, noise_std=2.0)
    task = family.sample(gen())
    assert float(task.info["w_star"].norm()) == pytest.approx(1.0)
    assert [len(task.batch(s, gen())[1]) for s in ("train", "val", "test")] == [30, 20, 10]
    assert task.divergence_bound == pytest.approx(80.0)
    # the noise is N(0, 4): the residual of w* has about that variance
    big = make_family("least-squares", dim=5, n_train=20000, n_val=0, n_test=1, noise_std=2.0).sample(gen())
    phi, y = big.batch("train", gen())
    assert float((y - phi @ big.info["w_star"]).var()) == pytest.approx(4.0, rel=0.05)
    with pytest.raises(ValueError, match="empty"):
        big.batch("val", gen())
    sgd = make_family("least-squares", dim=5, n_train=50, batch_size=8).sample(gen())
    assert len(sgd.batch("train", gen())[1]) == 8 and len(sgd.batch("val", gen())[1]) == 250


def test_cubic_regression_family():
    family = make_family("cubic-regression", noise_std=0.0)
    task = family.sample(gen())
    phi, y = task.batch("train", gen())
    u = phi[:, 1]
    assert torch.allclose(phi, torch.stack([torch.ones_like(u), u, u**2, u**3], dim=1))
    assert float(task.loss({"w": task.info["coef"]}, (phi, y))) == pytest.approx(0.0, abs=1e-10)


def test_stepsize_quadratic_closed_form_matches_gd():
    task = make_family("stepsize-quadratic", dtype=torch.float64).sample(gen())
    assert isinstance(task, StepSizeQuadraticTask)
    w = task.init_params(gen())["w"]
    assert torch.equal(w, task.init_params(gen(1))["w"])  # fixed w0
    batch = task.batch("train", gen())
    assert float(task.loss({"w": w}, batch)) == pytest.approx(float(0.5 * w @ task.H @ w))
    lam = task.eigenvalues
    assert torch.all(lam[1:] >= lam[:-1])
    eta = 0.5 / float(lam[-1])
    for _ in range(10):
        w = w - eta * torch.func.grad(task.loss)({"w": w}, batch)["w"]
    assert float(task.gd_log_loss(eta, 10)) == pytest.approx(math.log(float(task.loss({"w": w}, batch))), rel=1e-9)
    # long unrolls with a too-large step stay finite in log space, and the gradient in eta exists
    eta_t = torch.tensor(3.0 / float(lam[-1]), dtype=torch.float64, requires_grad=True)
    value = task.gd_log_loss(eta_t, 80) / 80
    value.backward()
    assert math.isfinite(float(value.detach())) and math.isfinite(float(eta_t.grad))


def test_mlp_loss_by_hand():
    family = make_family("digits-mlp20-sigmoid", dtype=torch.float64)
    task = family.sample(gen())
    params = task.init_params(gen())
    assert sorted(params) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert params["fc1.weight"].shape == (20, 64)
    x, y = task.batch("train", gen())
    assert x.shape == (128, 1, 8, 8)
    h = torch.sigmoid(x.flatten(1) @ params["fc1.weight"].T + params["fc1.bias"])
    logits = h @ params["fc2.weight"].T + params["fc2.bias"]
    manual = (torch.logsumexp(logits, 1) - logits.gather(1, y[:, None])[:, 0]).mean()
    assert float(task.loss(params, (x, y))) == pytest.approx(float(manual), rel=1e-12)
    with pytest.raises(KeyError, match="fc2.bias"):
        task.loss({k: v for k, v in params.items() if k != "fc2.bias"}, (x, y))


def test_conv_net_shape_on_digits():
    task = make_family("digits-conv").sample(gen())
    params = task.init_params(gen())
    assert params["conv1.weight"].shape == (16, 1, 3, 3)
    assert params["conv2.weight"].shape == (32, 16, 5, 5)
    assert params["fc.weight"].shape == (10, 32 * 4 * 4)
    timm_task = small_family("timm").sample(gen())
    assert timm_task.batch("test", gen())[0].shape == (8, 1, 16, 16)


def test_accuracy_metric_by_hand():
    task = make_family("digits-mlp20-relu").sample(gen())
    params = {k: torch.zeros_like(v) for k, v in task.init_params(gen()).items()}
    params["fc2.bias"][3] = 1.0  # always predicts class 3
    x, y = task.batch("test", gen())
    assert len(y) == 360  # the whole test split
    m = task.metrics(params, (x, y))
    assert m["accuracy"] == pytest.approx(float((y == 3).float().mean()))
    assert m["loss"] == pytest.approx(float(F.cross_entropy(task.logits(params, x), y)))


def test_accuracy_rises_with_training():
    task = make_family("digits-mlp20-relu").sample(gen())
    params = {k: v.clone().requires_grad_() for k, v in task.init_params(gen()).items()}
    test = task.batch("test", gen())
    assert task.metrics(params, test)["accuracy"] < 0.35
    opt = torch.optim.Adam(params.values(), lr=0.01)
    g = gen(1)
    for _ in range(150):
        opt.zero_grad()
        task.loss(params, task.batch("train", g)).backward()
        opt.step()
    assert task.metrics(params, test)["accuracy"] > 0.85


# ------------------------------------------------------------------ every family


@pytest.mark.parametrize("name", BATTERY)
def test_every_family_gradients_finite_and_deterministic(name):
    family = small_family(name)
    task = family.sample(gen(3))
    assert isinstance(task, Task)
    params = task.init_params(gen(4))
    batch = task.batch("train", gen(5))
    loss = task.loss(params, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    grads = grad(task.loss)(params, batch)
    assert grads.keys() == params.keys() and torch.isfinite(flat(grads)).all() and flat(grads).abs().sum() > 0
    for split in ("val", "test"):
        assert torch.isfinite(task.loss(params, task.batch(split, gen())))
    # the same seeds give the same task, parameters and batch; the global RNG is not touched
    state = torch.get_rng_state()
    again = family.sample(gen(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(flat(again.init_params(gen(4))), flat(params))
    assert float(again.loss(params, again.batch("train", gen(5)))) == float(loss)
    assert torch.equal(torch.get_rng_state(), state)
    if name not in FIXED_INIT:
        assert not torch.equal(flat(again.init_params(gen(6))), flat(params))
    # the config rebuilds the same family
    rebuilt = make_family(family.name, **family.config).sample(gen(3))
    assert float(rebuilt.loss(params, rebuilt.batch("train", gen(5)))) == float(loss)


def _hvp(task, params, batch, v):
    return jvp(lambda p: grad(task.loss)(p, batch), (params,), (v,))[1]


def test_hvp_quadratic_matches_analytic_hessian():
    task = make_family("quadratic", num_instances=3, dim=4, dtype=torch.float64).sample(gen())
    params, batch = task.init_params(gen()), task.batch("train", gen())
    v = {"x": torch.randn(3, 4, generator=gen(1), dtype=torch.float64)}
    hv = _hvp(task, params, batch, v)["x"]
    expected = 2 * torch.einsum("nji,njk,nk->ni", task.W, task.W, v["x"]) / 3  # (2/n) W^T W v
    assert torch.allclose(hv, expected)


@pytest.mark.parametrize("name", ["digits-mlp20-sigmoid", "conv", "rosenbrock", "lasso"])
def test_hvp_matches_finite_differences(name):
    task = small_family(name, dtype=torch.float64).sample(gen())
    params, batch = task.init_params(gen(1)), task.batch("train", gen(2))
    v = {k: torch.randn(p.shape, generator=gen(3), dtype=torch.float64) for k, p in params.items()}
    hv = flat(_hvp(task, params, batch, v))
    eps = 1e-5
    shifted = [grad(task.loss)({k: p + s * eps * v[k] for k, p in params.items()}, batch) for s in (1, -1)]
    fd = (flat(shifted[0]) - flat(shifted[1])) / (2 * eps)
    assert torch.isfinite(hv).all()
    assert torch.allclose(hv, fd, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ neural-task data options


def test_label_noise_subsets_and_shards():
    clean = make_family("mlp").sample(gen())
    noisy = make_family("mlp", label_noise=0.3).sample(gen())
    flipped = (clean.splits["train"][1] != noisy.splits["train"][1]).float().mean()
    assert float(flipped) == pytest.approx(0.3, abs=0.06)
    assert torch.equal(clean.splits["test"][1], noisy.splits["test"][1])
    assert not torch.equal(clean.splits["val"][1], noisy.splits["val"][1])
    assert len(make_family("mlp", n_train=100).sample(gen()).splits["train"][1]) == 100
    halves = [make_family("mlp", train_shard=(i, 2)).sample(gen()).splits["train"][0] for i in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 538
    assert not torch.equal(halves[0][:5], halves[1][:5])
    assert len(clean.batch("train", gen())[1]) == 128 and len(clean.batch("val", gen())[1]) == 360
    for size in ({"batch_size": 0}, {"batch_size": -3}, {"eval_batch_size": 0}, {"n_train": -100}):
        with pytest.raises(ValueError, match="must be a positive number of examples"):
            make_family("mlp", **size)


def test_a_corrupt_torchvision_file_is_a_clear_error(tmp_path):
    """torchvision's MNIST reader fails on a corrupt file with a bare AssertionError: it becomes the same clear
    FileNotFoundError (naming the root) as its RuntimeErrors."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00" * 16)  # e.g. an interrupted copy
    with pytest.raises(FileNotFoundError, match="torchvision could not read MNIST"):
        make_family("mnist-mlp20-sigmoid", data_root=tmp_path)


def test_mlp_family_on_torchvision_folder(tmp_path):
    from tests.tasks.test_data import _write_mnist

    _write_mnist(tmp_path)
    task = make_family("mnist-mlp20-sigmoid", data_root=tmp_path, batch_size=4).sample(gen())
    assert task.name == "mnist-mlp20-sigmoid"
    x, y = task.batch("train", gen())
    assert x.shape == (4, 1, 28, 28) and torch.isfinite(task.loss(task.init_params(gen()), (x, y)))
    with pytest.raises(FileNotFoundError, match="download=True"):
        make_family("mnist-conv", data_root=tmp_path / "missing")


@pytest.mark.parametrize("name", ["conv", "mlp", "resnet"])
def test_image_families_convert_channels_beside_their_own_options(name):
    """``image_channels`` converts the images for every image family, the conv net's widths (``channels``) included,
    and the config keeps both and rebuilds the same family."""
    family = make_family(name, image_channels=3, image_size=16, batch_size=2, eval_batch_size=2)
    assert family.input_shape == (3, 16, 16) and family.config["image_channels"] == 3
    rebuilt = make_family(family.name, **family.config)
    assert rebuilt.input_shape == (3, 16, 16) and rebuilt.config == family.config
    task = family.sample(gen())
    x, y = task.batch("train", gen())
    assert x.shape == (2, 3, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(task.loss(task.init_params(gen()), (x, y)))


# ------------------------------------------------------------------ registry and mixture


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if not n.startswith(NEEDS_ROOT)))
def test_presets(name):
    family = make_family(name, batch_size=4, eval_batch_size=4)
    for key, value in family.preset_defaults.items():
        assert family.config[key] == value
    task = family.sample(gen())
    assert task.name.startswith("digits-")
    with torch.no_grad():
        assert torch.isfinite(task.loss(task.init_params(gen()), task.batch("train", gen())))


def test_tasks_pickle():
    import pickle

    task = pickle.loads(pickle.dumps(make_family("digits-mlp20-sigmoid", batch_size=4).sample(gen())))
    params = task.init_params(gen())
    assert torch.isfinite(task.loss(params, task.batch("train", gen())))


def test_registry():
    assert {
        "quadratic",
        "lasso",
        "rosenbrock",
        "least-squares",
        "cubic-regression",
        "stepsize-quadratic",
        "mlp",
        "conv",
        "resnet",
        "timm",
        "mixture",
        "digits-mlp20-sigmoid",
    } <= set(TASK_FAMILIES)
    for name, cls in TASK_FAMILIES.items():
        assert cls.name == name and issubclass(cls, TaskFamily)
    with pytest.raises(KeyError, match="registered"):
        make_family("no-such-task")
    with pytest.raises(TypeError):
        make_family("quadratic", not_an_argument=1)
    with pytest.raises(ValueError, match="activation"):
        make_family("mlp", activation="swishy")
    assert make_family("digits-mlp20-sigmoid").sample(gen()).name == "digits-mlp20-sigmoid"


def test_mixture_samples_components_by_weight():
    default = make_family("mixture")
    assert len(default.components) == 18
    names = {default.sample(gen(s)).name for s in range(40)}
    assert len(names) > 8 and all(n.startswith("digits-mlp") for n in names)
    mix = MixtureFamily(
        components=["quadratic", {"name": "rosenbrock", "num_instances": 2}, "lasso"], weights=[1, 1, 0]
    )
    names = [mix.sample(gen(s)).name for s in range(30)]
    assert set(names) == {"quadratic", "rosenbrock"}
    assert mix.config["components"][1] == {"name": "rosenbrock", **mix.components[1].config}
    with pytest.raises(ValueError):
        MixtureFamily(components=["quadratic"], weights=[1, 2])


def test_task_names_resolve_the_same_way_everywhere():
    """A registered name and a "module:attr" factory build the same family for the meta-trainer and the
    evaluation harness (one resolution, :func:`learned_optim.tasks.make_family`)."""
    from learned_optim.bench.evaluate import resolve_task
    from learned_optim.meta.trainer import make_task_family
    from learned_optim.tasks import LassoFamily, make_family

    for name in ("lasso", "learned_optim.tasks.synthetic:LassoFamily"):
        assert isinstance(make_family(name), LassoFamily)
        assert isinstance(make_task_family(name), LassoFamily)
        assert isinstance(resolve_task(name).source, LassoFamily)
    with pytest.raises(TypeError, match="not a TaskFamily"):
        make_family("builtins:dict", x=4.0)
    with pytest.raises(KeyError, match="unknown task family"):
        make_family("no-such-family")
