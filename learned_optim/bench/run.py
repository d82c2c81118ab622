r"""Running the suite: optimizers and their tuning grids, the training loop, the run store, tuning.

**Baselines** (built from :data:`learned_optim.bench.baselines.BASELINES`), each tuned on the validation split
of one separate tuning seed with the same budget (the task's full horizon per grid point; in the full suite a
winning lr or weight decay at the edge of the grid extends the grid past it, see
:func:`learned_optim.bench.tuning.tune`):

* ``adamw``: ``torch.optim.AdamW`` with a linear warm-up over the first 5% of the steps then a cosine
  decay to 0 (:func:`lr_factor`), tuned over lr x weight decay;
* ``adam``: ``torch.optim.Adam`` at a constant lr, tuned over lr;
* ``sgd-momentum``: ``torch.optim.SGD`` with momentum 0.9 at a constant lr, tuned over lr;
* ``adamw-default``, on request: ``torch.optim.AdamW`` *untuned*, at torch's defaults (lr 1e-3, weight decay
  0.01) with AdamW's warm-up and cosine schedule: what a user who tunes nothing gets, the counterpart of the
  learned optimizers' ``default`` rule (its grid is that one setting, never extended);
* ``adamw-flagship-default``, on request: ``torch.optim.AdamW`` untuned at the flagship's checkpoint defaults (the
  lr, weight decay and schedule a user who passes none gets from :data:`learned_optim.FLAGSHIP`): the flagship's
  ``default`` rule with AdamW in its place, one setting read from the zoo's config.json;
* the flatness-seeking baselines, on request (``--baselines``; the seeds' comparisons): ``sam`` (SAM,
  :math:`\rho` 0.05), ``gsam`` (GSAM, :math:`\rho` 0.05, :math:`\alpha` 0.4) and ``gam`` (GAM, the reference
  CIFAR settings), each over SGD with momentum 0.9, and ``entropy-sgd`` (Entropy-SGD, 20 SGLD steps), all with
  AdamW's warm-up and cosine schedule, tuned over lr (:func:`learned_optim.bench.baselines.sam` and the others:
  2, 2, 4 and 20 gradients per step); and ``sam-adamw``, SAM (:math:`\rho` 0.05) over AdamW with AdamW's grid
  and schedule, the flatness term on the baseline itself. Their second pass updates a BatchNorm model's
  running statistics again (``digits-resnet-bn``), as ``pytorch_optimizer``'s SAM and GSAM do when not told otherwise.
* ``muon-adamw``, on request: Muon (momentum 0.95, Nesterov, 5 Newton-Schulz steps) on every matrix (conv
  weights by their matrix view) with its update's RMS matched to AdamW's (:math:`0.2\sqrt{\max(A, B)}`), AdamW on
  the other parameters (:class:`learned_optim.bench.baselines.MuonAdamW`), tuned like ``adamw``: AdamW's grid,
  its growth past a winning edge and its warm-up and cosine schedule; one gradient per step. Plain Muon, the
  reference for the learned optimizers that orthogonalise their matrices' updates with the same iteration.

**Learned optimizers** (zoo name, checkpoint folder or Hub id), each also adapted to every run's model first
with ``adapt_steps`` (``--adapt-steps``, M-L2O's test-time adaptation, :func:`adapt_before_training`), run
under one or more *lr rules*:

* ``adamw``: the user swaps the class and keeps AdamW's tuned lr, weight decay and schedule;
* ``tuned``: its own lr tuned on the same budget: the checkpoint's default lr times
  :data:`LEARNED_LR_MULTIPLIERS` when that default is a step multiplier (``>= 0.1``, the old zoo's 1.0),
  AdamW's lr grid when it is a real learning rate; its default weight decay and schedule;
* ``tuned-wd``: tuned vs tuned on AdamW's whole grid: the ``tuned`` rule's learning rates times AdamW's
  weight decays (and, in the full suite, the same growth past a winning edge on both axes), with its default
  schedule;
* ``default``: the checkpoint's default lr and weight decay and its schedule (``config.json``'s
  top-level ``"schedule"``, ``"constant"`` when absent), the same for every task.

**Runs**: :func:`train` trains the model of a seed on the seed's batches (every optimizer sees the same
initialisation and batches), records the training loss of every step, the validation loss (and
accuracy) at step 0 and every ``eval_every`` steps, the final test values and the wall time per step
(forward, backward, update and scheduler; batch drawing and evaluation excluded). A non-finite loss or
gradient ends the run (``nonfinite_at``); ``diverged`` is :func:`learned_optim.bench.stats.diverged` (that,
or a final training loss above the first step's). With ``flatness`` (:data:`SUITE_FLATNESS`, ``--flatness``) a
finished run also measures how flat the loss is at its final weights (:mod:`learned_optim.bench.flatness` through
:class:`~learned_optim.bench.tasks.FunctionalWorkload`: Hessian trace and top eigenvalue on training batches, PGA
sharpness on a validation batch), recorded under ``flatness``.

**Store**: every finished run is one gzip-compressed JSON record ``<out>/runs/<key>.json.gz`` (plain
``<key>.json`` records of earlier versions are read too), the key the SHA-256 of (suite
version, task config hash, optimizer identity, lr / weight decay / schedule, seed, and the flatness options
when flatness is measured); a rerun, a resume
after interruption or another optimizer's run in the same folder (or with ``--baseline-dir``) reuses
the records instead of training again. The task config hash covers the model, data fingerprint,
horizon, batch size and evaluation, and the optimizer identity covers the checkpoint's weights, so a
change to either makes new keys.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch.optim import Optimizer

from .._files import write_atomically
from ..hub import FLAGSHIP, read_config, weights_sha256, zoo_dir
from ..nets.base import FAMILIES
from ..optimizer import NonFiniteGradientError
from ..schedules import lr_factor
from . import stats
from .baselines import BASELINES, ENTROPY_SGD_GRID
from .flatness import FlatnessOptions, task_flatness
from .specs import resolve_optimizer
from .tasks import Workload

__all__ = [
    "SUITE_VERSION",
    "TUNE_SEED",
    "LR_RULES",
    "LEARNED_LR_MULTIPLIERS",
    "Grid",
    "FULL_GRIDS",
    "baseline_grids",
    "QUICK_GRIDS",
    "BASELINE_NAMES",
    "Setting",
    "BenchOptimizer",
    "baseline_optimizer",
    "learned_optimizer",
    "UnknownOptimizerError",
    "train",
    "SUITE_FLATNESS",
    "RunStore",
    "read_run_record",
]

#: Bumped whenever a change alters what a run measures; part of every run's key.
SUITE_VERSION = 1
#: Seed of the tuning runs (never an evaluation seed).
TUNE_SEED = 1_000_000
LR_RULES = ("adamw", "tuned", "tuned-wd", "default")
#: The flatness measures of the suite's ``--flatness``, at the final weights: reverse-over-reverse
#: Hessian-vector products (the suite's LSTMs and fused attention have no forward-mode derivative), 10 probes
#: and 10 power iterations on 2 training batches, PGA sharpness at three radii on one validation batch.
SUITE_FLATNESS = FlatnessOptions(
    probes=10,
    iters=10,
    radii=(0.001, 0.01, 0.05),
    hessian_batches=2,
    metrics=("hessian_trace", "hessian_eigenvalue", "sharpness"),
    hvp_mode="reverse",
    vectorize=False,
)
#: The ``tuned`` rule's grid, relative to the checkpoint's default lr, when that default is a multiplier.
LEARNED_LR_MULTIPLIERS: tuple[float, ...] = (0.1, 0.3, 1.0)


class UnknownOptimizerError(ValueError):
    """Neither a suite baseline nor a loadable learned optimizer (the message says what exists)."""


@dataclasses.dataclass(frozen=True)
class Grid:
    """A baseline's tuning grid: every (lr, weight decay) pair, with one schedule."""

    lr: tuple[float, ...]
    weight_decay: tuple[float, ...] = (0.0,)
    schedule: str = "constant"

    def settings(self, optimizer: str) -> list[Setting]:
        return [Setting(optimizer, lr, wd, self.schedule) for lr in self.lr for wd in self.weight_decay]


ADAMW_FULL_GRID = Grid((3e-4, 1e-3, 3e-3, 1e-2, 3e-2), (0.0, 0.1), "cosine")
ADAMW_QUICK_GRID = Grid((1e-3, 1e-2), (0.0, 0.1), "cosine")
#: ``adamw-default``'s one setting: torch.optim.AdamW's default lr and weight decay, AdamW's schedule.
ADAMW_DEFAULTS_GRID = Grid((1e-3,), (0.01,), "cosine")


def flagship_defaults_grid() -> Grid:
    """``adamw-flagship-default``'s one setting: the lr, weight decay and schedule of the zoo flagship's config.json
    (what :func:`~learned_optim.from_pretrained` gives a user who passes none; its default rule's setting)."""
    flagship = learned_optimizer(str(zoo_dir() / FLAGSHIP)).default_setting()
    return Grid((flagship.lr,), (flagship.weight_decay,), flagship.schedule)


FULL_GRIDS: dict[str, Grid] = {
    "adamw": ADAMW_FULL_GRID,
    "adamw-default": ADAMW_DEFAULTS_GRID,
    "adam": Grid((3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),
    "sgd-momentum": Grid((3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    **dict.fromkeys(("sam", "gsam", "gam"), Grid((3e-3, 1e-2, 3e-2, 1e-1, 3e-1), schedule="cosine")),
    "entropy-sgd": Grid(ENTROPY_SGD_GRID, schedule="cosine"),
    "sam-adamw": ADAMW_FULL_GRID,
    "muon-adamw": ADAMW_FULL_GRID,
}
QUICK_GRIDS: dict[str, Grid] = {
    "adamw": ADAMW_QUICK_GRID,
    "adamw-default": ADAMW_DEFAULTS_GRID,
    "adam": Grid((1e-3, 1e-2)),
    "sgd-momentum": Grid((3e-2, 3e-1)),
    **dict.fromkeys(("sam", "gsam", "gam"), Grid((3e-2, 3e-1), schedule="cosine")),
    "entropy-sgd": Grid((1.0, 0.1), schedule="cosine"),
    "sam-adamw": ADAMW_QUICK_GRID,
    "muon-adamw": ADAMW_QUICK_GRID,
}
QUICK_LEARNED_LR_MULTIPLIERS: tuple[float, ...] = (0.3, 1.0)


def baseline_grids(names: Sequence[str], quick: bool) -> dict[str, Grid]:
    """The tuning grids of the baselines ``names``: :data:`QUICK_GRIDS` or :data:`FULL_GRIDS`, and
    ``adamw-flagship-default``'s one setting read from the zoo (:func:`flagship_defaults_grid`) when it is asked for."""
    static = QUICK_GRIDS if quick else FULL_GRIDS
    return {n: flagship_defaults_grid() if n == "adamw-flagship-default" else static[n] for n in names}


#: Test-time adaptation in the suite (``--adapt-steps``): unroll length, Adam lr on the net's weights, and the
#: offset of the seed of the adaptation's batch stream.
ADAPT_UNROLL = 20
ADAPT_LR = 1e-3
ADAPT_SEED_OFFSET = 2_000_000


@dataclasses.dataclass(frozen=True)
class Setting:
    """The hyper-parameters of one run: optimizer name, lr, decoupled weight decay, schedule."""

    optimizer: str
    lr: float
    weight_decay: float
    schedule: str

    def describe(self) -> str:
        wd = f", wd {self.weight_decay:g}" if self.weight_decay else ""
        return f"lr {self.lr:g}{wd}, {self.schedule}"


@dataclasses.dataclass
class BenchOptimizer:
    """An optimizer under test: ``build(params, lr, weight_decay)`` and what identifies it in run keys."""

    name: str
    kind: str  # "baseline" | "learned"
    build: Callable[[list[torch.Tensor], float, float], Optimizer]
    identity: dict[str, Any]
    default_lr: float | None = None
    default_weight_decay: float = 0.0
    default_schedule: str = "constant"
    #: A learned optimizer's checkpoint folder.
    path: Path | None = None
    #: Test-time adaptation of a learned optimizer's net before training (:func:`adapt_before_training`).
    adapt_steps: int = 0

    def tuned_grid(self, adamw_grid: Grid, rule: str = "tuned", quick: bool = False) -> list[Setting]:
        """The grid that ``rule`` (``tuned`` or ``tuned-wd``, see the module docstring) tunes this optimizer on."""
        if rule not in ("tuned", "tuned-wd"):
            raise ValueError(f"{rule!r} tunes nothing: the tuned rules are 'tuned' and 'tuned-wd'")
        assert self.default_lr is not None
        if self.default_lr >= 0.1:
            mult = QUICK_LEARNED_LR_MULTIPLIERS if quick else LEARNED_LR_MULTIPLIERS
            lrs: Sequence[float] = [self.default_lr * m for m in mult]
        else:
            lrs = adamw_grid.lr
        decays = adamw_grid.weight_decay if rule == "tuned-wd" else (self.default_weight_decay,)
        return Grid(tuple(lrs), tuple(decays), self.default_schedule).settings(self.name)

    def default_setting(self) -> Setting:
        assert self.default_lr is not None
        return Setting(self.name, self.default_lr, self.default_weight_decay, self.default_schedule)


#: The suite's baselines: name -> (the :data:`.baselines.BASELINES` entry, its fixed keyword arguments).
_BASELINE_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "adam": ("adam", {}),
    "sgd-momentum": ("sgd", {"momentum": 0.9}),
    "sam": ("sam", {"momentum": 0.9}),
    "gsam": ("gsam", {"momentum": 0.9}),
    "gam": ("gam", {"momentum": 0.9}),
    "entropy-sgd": ("entropy-sgd", {}),
    "sam-adamw": ("sam-adamw", {}),
    "muon-adamw": ("muon-adamw", {}),
    "adamw-default": ("adamw", {}),
    "adamw-flagship-default": ("adamw", {}),
}
#: Every baseline the suite knows, by name.
BASELINE_NAMES: tuple[str, ...] = tuple(_BASELINE_CLASSES)


def baseline_optimizer(name: str) -> BenchOptimizer:
    """A suite baseline by name (see the module docstring), built from its :data:`.baselines.BASELINES` entry."""
    if name not in _BASELINE_CLASSES:
        raise UnknownOptimizerError(f"unknown baseline {name!r}; the suite's baselines: {', '.join(BASELINE_NAMES)}")
    registered, extra = _BASELINE_CLASSES[name]
    cls = BASELINES[registered].opt_class

    def build(params: list[torch.Tensor], lr: float, weight_decay: float) -> Optimizer:
        return cls(params, lr=lr, weight_decay=weight_decay, **extra)

    return BenchOptimizer(name, "baseline", build, {"class": f"{cls.__module__}.{cls.__qualname__}", **extra})


@functools.cache
def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of this package's source (``*.py`` and the native kernels' ``csrc``): recorded in
    every run, not in its key, so a table can be audited for runs made by different code (a change of float
    rounding, e.g. a kernel's summation order, can turn a run at the edge of stability into another run)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp", ".h") and p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


#: Optimizer defaults every run passes itself (its setting's lr and weight decay, in the run's key): a checkpoint's
#: value of them changes no run.
SETTING_DEFAULTS: tuple[str, ...] = ("lr", "weight_decay")


def trained_setting_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """config.json's optimizer defaults with :data:`SETTING_DEFAULTS` as they were before any change after training
    (``meta reconfigure --optimizer``, recorded in ``training.reconfigured``): a learned optimizer's run identity, so
    that a new default lr or weight decay keeps the keys of the runs stored before it (they would train the same)."""
    defaults = dict(config.get("optimizer") or {})
    for record in reversed((config.get("training") or {}).get("reconfigured") or []):
        for key, before in (record.get("before") or {}).items():
            name = key.removeprefix("optimizer.")
            if key.startswith("optimizer.") and name in SETTING_DEFAULTS:
                if before is None:
                    defaults.pop(name, None)
                else:
                    defaults[name] = before
    return defaults


def learned_optimizer(name_or_dir: str, adapt_steps: int = 0) -> BenchOptimizer:
    """A learned optimizer (zoo name, checkpoint folder or Hub id) with its checkpoint's defaults; with
    ``adapt_steps`` > 0, adapted to each run's model before training (:func:`adapt_before_training`; named
    ``<name>+adapt<steps>``, a different identity).

    Raises :class:`UnknownOptimizerError` naming the zoo entries and baselines when it cannot be loaded.
    """
    if adapt_steps < 0:
        raise ValueError(f"adapt_steps must be >= 0, got {adapt_steps}")
    from ..hub import CheckpointError, from_pretrained, list_pretrained

    try:
        spec = resolve_optimizer(name_or_dir)
    except (CheckpointError, OSError, ValueError) as err:
        why = str(err).splitlines()[0]
        zoo = "" if "zoo name" in why else f"; zoo: {', '.join(e['name'] for e in list_pretrained())}"  # listed once
        raise UnknownOptimizerError(
            f"cannot load optimizer {name_or_dir!r}: {why}{zoo}; the suite's baselines (--baselines): "
            f"{', '.join(BASELINE_NAMES)}"
        ) from None
    if spec.kind != "learned":
        raise UnknownOptimizerError(f"{name_or_dir!r} is an evaluate baseline; pass it with --baselines instead")
    folder = Path(spec.info["path"])
    config = read_config(folder)
    defaults = config.get("optimizer") or {}

    def build(params: list[torch.Tensor], lr: float, weight_decay: float) -> Optimizer:
        return from_pretrained(str(folder), params, lr=lr, weight_decay=weight_decay)

    # what the step depends on (not descriptions, cards or recorded results, which must not invalidate runs)
    stepping = {k: config.get(k) for k in ("family", "net", "schedule")}
    stepping["optimizer"] = trained_setting_defaults(config)
    identity: dict[str, Any] = {
        "weights": weights_sha256(folder),
        "config": hashlib.sha256(json.dumps(stepping, sort_keys=True).encode()).hexdigest()[:16],
    }
    if adapt_steps:
        identity["adapt"] = {"steps": adapt_steps, "unroll": ADAPT_UNROLL, "lr": ADAPT_LR}
    return BenchOptimizer(
        f"{spec.label}+adapt{adapt_steps}" if adapt_steps else spec.label,
        "learned",
        build,
        identity,
        default_lr=float(defaults.get("lr", FAMILIES[config["family"]].default_lr)),  # as from_pretrained takes it
        default_weight_decay=float(defaults.get("weight_decay", 0.0)),
        default_schedule=config.get("schedule") or "constant",
        path=folder,
        adapt_steps=adapt_steps,
    )


# ------------------------------------------------------------------------------------------ one run
def _round(v: float) -> float | None:
    return float(f"{v:.6g}") if math.isfinite(v) else None


def adapt_before_training(
    opt: Optimizer, model: torch.nn.Module, workload: Workload, steps: int, seed: int
) -> dict[str, Any]:
    """M-L2O's test-time adaptation in a suite run: :func:`learned_optim.adapt` with ``steps`` Adam steps (lr
    :data:`ADAPT_LR`) of :data:`ADAPT_UNROLL`-step unrolls chained from the run's initialisation (the first
    ``steps * ADAPT_UNROLL`` steps of training), at the run's lr, on training batches of a stream of their own
    (seed ``ADAPT_SEED_OFFSET + seed``: the run's batch stream is the other contenders'); the model and the
    optimizer's state are restored, non-finite steps are skipped. Returns what to record: the meta-losses, the
    skipped steps and the wall time."""
    from ..adapt import adapt

    generator = torch.Generator().manual_seed(ADAPT_SEED_OFFSET + seed)
    batches = []
    for _ in range(steps * (ADAPT_UNROLL + 1)):
        x, y = workload.batch(generator)
        batches.append((x, (x, y)))
    tick = time.perf_counter()
    result = adapt(
        opt,
        model,
        lambda out, xy: workload.score(out.float(), *xy)[0],
        batches,
        steps=steps,
        unroll=ADAPT_UNROLL,
        lr=ADAPT_LR,
        objective="log",
        nonfinite="skip",
    )
    return {
        "meta_losses": [_round(v) for v in result.meta_losses],
        "skipped_steps": result.skipped_steps,
        "time": time.perf_counter() - tick,
    }


def train(
    workload: Workload,
    optimizer: BenchOptimizer,
    setting: Setting,
    seed: int,
    flatness: FlatnessOptions | None = None,
) -> dict[str, Any]:
    """One run (see the module docstring); returns its record (without the key)."""
    steps, every = workload.steps, workload.eval_every
    model = workload.build_model(seed)
    opt = optimizer.build(list(model.parameters()), setting.lr, setting.weight_decay)
    adaptation: dict[str, Any] = {}
    if optimizer.adapt_steps:  # at the run's full lr, before the schedule's warm-up scales it
        adaptation = {"adaptation": adapt_before_training(opt, model, workload, optimizer.adapt_steps, seed)}
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(setting.schedule, t, steps))
    generator = torch.Generator().manual_seed(seed)
    val_steps: list[int] = []
    val: dict[str, list[float]] = {}

    def record(step: int) -> float:
        values = workload.measure(model, "val")
        val_steps.append(step)
        for k, v in values.items():
            val.setdefault(k, []).append(v)
        return values["loss"]

    initial = record(0)
    train_loss: list[float] = []
    nonfinite_at, elapsed, start = None, 0.0, time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            batch = workload.batch(generator)

            def closure(batch=batch) -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = workload.loss(model, batch)
                loss.backward()
                return loss

            tick = time.perf_counter()
            try:
                # torch's stub types the closure as returning a float; like torch.optim, ours returns the loss
                loss = float(cast(torch.Tensor, opt.step(closure)).detach())  # type: ignore[arg-type]
            except NonFiniteGradientError:
                loss = math.nan
            scheduler.step()
            elapsed += time.perf_counter() - tick
            train_loss.append(loss)
            if not math.isfinite(loss):
                nonfinite_at = step
                break
            if (step + 1) % every == 0 or step + 1 == steps:
                if not math.isfinite(record(step + 1)):
                    nonfinite_at = step + 1
                    break
    final_val = val["loss"][-1] if nonfinite_at is None else math.nan
    test = workload.measure(model, "test") if nonfinite_at is None else {}
    flat: dict[str, Any] = {}
    if flatness is not None:
        tick = time.perf_counter()
        values: dict[str, float] = {}
        if nonfinite_at is None:
            functional = workload.functional(model)
            values = task_flatness(functional, functional.params(), flatness, torch.Generator().manual_seed(seed))
        flat = {"flatness": {k: _round(v) for k, v in values.items()}, "flatness_time": time.perf_counter() - tick}
    return {
        "suite_version": SUITE_VERSION,
        "task": workload.name,
        "task_hash": workload.config_hash,
        "optimizer": setting.optimizer,
        "identity": optimizer.identity,
        "setting": dataclasses.asdict(setting),
        "seed": seed,
        "steps": steps,
        "train_loss": [_round(v) for v in train_loss],
        "val_steps": val_steps,
        "val": {k: [_round(v) for v in vs] for k, vs in val.items()},
        "initial_val_loss": _round(initial),
        "final": {
            "val_loss": _round(final_val),
            **({"val_accuracy": _round(val["accuracy"][-1])} if "accuracy" in val and nonfinite_at is None else {}),
            **{f"test_{k}": _round(v) for k, v in test.items()},
        },
        "nonfinite_at": nonfinite_at,
        "diverged": stats.diverged(train_loss, nonfinite_at),
        **adaptation,
        **flat,
        "time_per_step": elapsed / max(1, len(train_loss)),
        "wall_time": time.perf_counter() - start,
        "torch": torch.__version__,
        "code": code_fingerprint(),
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------ store
#: A stored run's file name after its key (gzip-compressed JSON); :func:`read_run_record` also reads ``.json``.
RECORD_SUFFIX = ".json.gz"


def read_run_record(folders: Sequence[str | os.PathLike], key: str) -> dict[str, Any] | None:
    """The stored run ``key`` from the first of ``folders`` (each a ``runs/`` folder) that holds it, or ``None``.

    A file that cannot be read as a run record, or whose record is another run's (a file copied or renamed under
    the wrong key), is passed over with a warning naming it: the run is then looked up further or trained again."""
    for folder in map(Path, folders):
        for path, read in (
            (folder / f"{key}{RECORD_SUFFIX}", lambda p: gzip.decompress(p.read_bytes())),
            (folder / f"{key}.json", lambda p: p.read_bytes()),
        ):
            if not path.is_file():
                continue
            try:
                record = json.loads(read(path))
            except (OSError, EOFError, zlib.error, ValueError) as err:  # (JSON's errors are ValueErrors)
                warnings.warn(f"ignoring the unreadable run record {path} ({err})", stacklevel=2)
                continue
            if not isinstance(record, dict) or record.get("key") != key:
                found = record.get("key") if isinstance(record, dict) else type(record).__name__
                warnings.warn(f"ignoring {path}: it holds the record of run {found!r}, not {key!r}", stacklevel=2)
                continue
            return record
    return None


class RunStore:
    """Finished runs as records ``<folder>/runs/<key>.json.gz`` (:func:`read_run_record`; see the module docstring).

    ``reuse=False`` trains every run again (and overwrites the records); ``extra`` folders are read too
    (e.g. a folder of baseline runs shared by several optimizers) but never written.
    """

    def __init__(self, folder: str | os.PathLike, *, extra: Sequence[str | os.PathLike] = (), reuse: bool = True):
        self.folder = Path(folder) / "runs"
        self.extra = [Path(e) / "runs" for e in extra]
        self.reuse = reuse
        self.trained = 0
        self.reused = 0

    @staticmethod
    def key(
        workload: Workload,
        optimizer: BenchOptimizer,
        setting: Setting,
        seed: int,
        flatness: FlatnessOptions | None = None,
    ) -> str:
        what: dict[str, Any] = {
            "suite_version": SUITE_VERSION,
            "task": workload.config_hash,
            "optimizer": setting.optimizer,
            "identity": optimizer.identity,
            "setting": dataclasses.asdict(setting),
            "seed": seed,
        }
        if flatness is not None:  # a run measured for flatness is another record (keys without it unchanged)
            what["flatness"] = dataclasses.asdict(flatness)
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, key: str) -> dict[str, Any] | None:
        return read_run_record((self.folder, *self.extra), key) if self.reuse else None

    def put(self, record: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(record, allow_nan=False) + "\n").encode()
        # mtime 0: the same record is the same bytes
        write_atomically(self.folder / f"{record['key']}{RECORD_SUFFIX}", gzip.compress(data, mtime=0))

    def run(
        self,
        workload: Workload,
        optimizer: BenchOptimizer,
        setting: Setting,
        seed: int,
        on_done: Callable[[int], object] | None = None,
        flatness: FlatnessOptions | None = None,
    ) -> dict[str, Any]:
        """The record of this run (with its flatness measures if ``flatness``): from the store, or trained now
        and stored."""
        key = self.key(workload, optimizer, setting, seed, flatness)
        record = self.get(key)
        if record is None:
            record = {"key": key, **train(workload, optimizer, setting, seed, flatness)}
            self.put(record)
            self.trained += 1
        else:
            self.reused += 1
        if on_done is not None:
            on_done(workload.steps)
        return record
