"""M-L2O (test-time fast self-adaptation, SPEC §4): the LASSO table, the Rosenbrock transfer, the
adaptation-distribution sweep and one neural case, from the zoo's ``m-l2o`` and ``rnnprop-lasso``.

Methods (all RNNProp, all adapted/tested on the same instances in each run):

* **Vanilla L2O**: a randomly initialised net, adapted ``K`` steps;
* **DT** (Direct Transfer): ``rnnprop-lasso`` (meta-trained normally on LASSO, sigma in [0.1, 1]), not adapted;
* **TL** (Transfer Learning): ``rnnprop-lasso`` adapted ``K`` steps;
* **M-L2O**: ``m-l2o`` (meta-trained with MAML on the same distribution) adapted ``K`` steps
  (and, for reference, "M-L2O (no adapt)").

Adaptation = ``K`` Adam (lr 1e-3) updates of the net's weights, each on one 20-step segment of
adaptation instances (LASSO with W ~ N(0, sigma^2), fresh instances every 200 steps); test = 1000
steps on a *different* instance of the same sigma. Metrics: minimum and mean over the 1000 test steps
of log10 loss; mean and 95% t-interval over ``--runs`` runs; paired differences M-L2O - TL and M-L2O - DT.

    python examples/m_l2o_lasso.py                                  # everything (~1-2 h on a busy 2-core CPU)
    python examples/m_l2o_lasso.py --parts table --adapt-steps 5    # the main table only
    python examples/m_l2o_lasso.py --quick                          # smoke test (2 runs, 50 steps)

Writes ``--out`` (default ``examples/figures/m_l2o``): ``README.md`` (all tables), ``<part>.json`` (per-run
numbers) and PNG figures. Parts already computed are re-used from their JSON unless ``--recompute``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import learned_optim
from learned_optim.bench.evaluate import mean_confidence_interval
from learned_optim.meta.maml import adapt_on_task, evaluate_rule
from learned_optim.meta.trainer import derive_seed
from learned_optim.nets import RNNProp, UpdateRule
from learned_optim.tasks import make_family

PAPER = {  # SPEC §4, Table 1: min log10 loss, Vanilla / M-L2O / DT / TL (5 adaptation steps)
    10: (0.033, -3.712, -4.233, -4.077),
    25: (1.559, -3.433, -4.125, -4.019),
    50: (0.550, -3.285, -3.098, -3.181),
    100: (2.435, -2.408, -1.775, -1.961),
    200: (4.104, -1.396, -0.453, -0.982),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gen(*keys: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(0, *keys))


def log10_metrics(curve: torch.Tensor) -> dict[str, float]:
    """min and mean of log10 f over the test steps t = 1..T (curve holds f_0..f_T)."""
    logs = torch.log10(curve[1:].clamp_min(1e-300))
    return {"min": float(logs.min()), "mean": float(logs.mean()), "final": float(logs[-1])}


def vanilla_net(run: int) -> UpdateRule:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, "vanilla-init", run))
        return RNNProp()


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.m_l2o, _ = learned_optim.load_rule(args.m_l2o)
        self.baseline, _ = learned_optim.load_rule(args.baseline)

    def adapted(self, rule: UpdateRule, family, steps: int, seed: int) -> UpdateRule:
        if steps == 0:
            return rule
        net, _ = adapt_on_task(
            rule,
            family,
            steps=steps,
            lr=self.args.adapt_lr,
            segment_length=self.args.segment,
            trajectory_length=self.args.adapt_trajectory,
            seed=seed,
        )
        return net

    def compare(
        self,
        adapt_family,
        test_task,
        run: int,
        seed: int,
        steps_list: Sequence[int],
        *,
        methods: Sequence[str] = ("Vanilla", "M-L2O", "DT", "TL"),
        curves: bool = False,
    ) -> dict[str, Any]:
        """Every method on one run: adaptation instances from ``adapt_family`` (seed ``seed``), test on
        ``test_task``."""
        out: dict[str, Any] = {}
        test_seed = derive_seed(0, "test-run", seed)

        def test(name: str, rule: UpdateRule) -> None:
            curve = evaluate_rule(rule, test_task, steps=self.args.test_steps, seed=test_seed)
            out[name] = log10_metrics(curve)
            if curves:
                out[name]["curve"] = [round(float(v), 4) for v in torch.log10(curve.clamp_min(1e-300))]

        if "DT" in methods:
            test("DT", self.baseline)
        if "M-L2O" in methods and 0 in steps_list or "M-L2O (no adapt)" in methods:
            test("M-L2O (no adapt)", self.m_l2o)
        for k in [k for k in steps_list if k > 0]:
            if "Vanilla" in methods:
                test(f"Vanilla/{k}", self.adapted(vanilla_net(run), adapt_family, k, seed))
            if "TL" in methods:
                test(f"TL/{k}", self.adapted(self.baseline, adapt_family, k, seed))
            if "M-L2O" in methods:
                test(f"M-L2O/{k}", self.adapted(self.m_l2o, adapt_family, k, seed))
        return out


# ------------------------------------------------------------------------------------------- statistics
def summarize(runs: list[dict[str, Any]], metric: str) -> dict[str, tuple[float, float]]:
    names = sorted({k for r in runs for k in r})
    return {n: mean_confidence_interval([r[n][metric] for r in runs if n in r]) for n in names}


def paired(runs: list[dict[str, Any]], a: str, b: str, metric: str) -> tuple[float, float]:
    return mean_confidence_interval([r[a][metric] - r[b][metric] for r in runs if a in r and b in r])


def fmt(mean_half: tuple[float, float]) -> str:
    mean, half = mean_half
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {half:.3f}" if math.isfinite(half) else f"{mean:.3f}"


# -------------------------------------------------------------------------------------------------- parts
def cached(args: argparse.Namespace, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` saved as ``<out>/parts/<name>.json``, or re-used from there (unless ``--recompute``).

    Results are saved piece by piece (one sigma at a time), so an interrupted run resumes where it
    stopped and several processes can fill in different pieces (e.g. ``--sigmas 10 25`` and
    ``--sigmas 50 100 200``) before a last invocation writes the report from all of them.
    """
    path = Path(args.out) / "parts" / f"{name}.json"
    if path.exists() and not args.recompute:
        return json.loads(path.read_text())["result"]
    started = time.perf_counter()
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": vars(args), "seconds": time.perf_counter() - started, "result": result}) + "\n")
    tmp.replace(path)
    return result


def part_table(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for sigma in args.sigmas:
        results[str(sigma)] = cached(
            args,
            f"table-sigma{sigma}-k{'-'.join(map(str, args.adapt_steps))}",
            lambda sigma=sigma: table_sigma(runner, args, sigma),
        )
    return results


def table_sigma(runner: Runner, args: argparse.Namespace, sigma: int) -> list[dict[str, Any]]:
    family = make_family("lasso", sigma=float(sigma))
    runs = []
    started = time.perf_counter()
    for r in range(args.runs):
        seed = derive_seed(0, "lasso", sigma, r)
        test_task = family.sample(gen("lasso-test", sigma, r))
        runs.append(
            runner.compare(family, test_task, r, seed, [0, *args.adapt_steps], curves=sigma in args.curve_sigmas)
        )
    log(
        f"table: sigma={sigma} done in {time.perf_counter() - started:.0f}s; min log10 loss "
        + ", ".join(f"{k}={fmt(v)}" for k, v in summarize(runs, "min").items())
    )
    return runs


def lasso_optimum(task) -> float:
    """The exact optimum ``f*`` of a LASSO task (mean over its instances), by the LARS-lasso homotopy
    (``sklearn.linear_model.LassoLars``, exact for d = 10; it matches 40k FISTA iterations to 1e-11)."""
    import warnings

    import numpy as np
    from sklearn.linear_model import LassoLars

    W, y = task.W.double().cpu().numpy(), task.y.double().cpu().numpy()
    d, values = W.shape[2], []
    for Wi, yi in zip(W, y, strict=True):
        # sklearn minimises 1/(2 d) ||y - W x||^2 + alpha ||x||_1 = (1/d) (1/2 ||.||^2 + d alpha ||x||_1)
        model = LassoLars(alpha=task.l1 / d, fit_intercept=False, max_iter=10_000, eps=1e-16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(Wi, yi)
        x = model.coef_
        values.append(task.quad_scale * np.sum((Wi @ x - yi) ** 2) + task.l1 * np.abs(x).sum())
    return float(np.mean(values))


def part_optimum(args: argparse.Namespace) -> dict[str, list[float]]:
    """log10 f* of every test instance of the table (same seeds)."""
    out = {}
    for sigma in args.sigmas:

        def compute(sigma: int = sigma) -> list[float]:
            family = make_family("lasso", sigma=float(sigma))
            return [math.log10(lasso_optimum(family.sample(gen("lasso-test", sigma, r)))) for r in range(args.runs)]

        out[str(sigma)] = cached(args, f"optimum-sigma{sigma}", compute)
    return out


def with_gap(table: dict[str, Any], optimum: dict[str, list[float]]) -> dict[str, Any]:
    """Adds ``gap``: log10(min_t f_t - f*) per run and method (floored at float32 resolution, 1e-7 f*)."""
    for sigma, runs in table.items():
        if sigma not in optimum:
            continue
        for r, row in enumerate(runs):
            f_star = 10 ** optimum[sigma][r]
            for metrics in row.values():
                metrics["gap"] = math.log10(max(10 ** metrics["min"] - f_star, 1e-7 * f_star))
    return table


def part_rosenbrock(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    family = make_family("rosenbrock")
    runs = []
    for r in range(args.runs):
        seed = derive_seed(0, "rosenbrock", r)
        runs.append(
            runner.compare(
                family, family.sample(gen("rosenbrock-test", r)), r, seed, [0, *args.adapt_steps[:1]], curves=True
            )
        )
    log("rosenbrock: min log10 loss " + ", ".join(f"{k}={fmt(v)}" for k, v in summarize(runs, "min").items()))
    return {"runs": runs}


def part_sweep(runner: Runner, args: argparse.Namespace) -> dict[str, Any]:
    test_family = make_family("lasso", sigma=float(args.sweep_test_sigma))
    out: dict[str, Any] = {}
    k = args.adapt_steps[0]
    for adapt_sigma in args.sweep_adapt_sigmas:

        def compute(adapt_sigma: float = adapt_sigma) -> list[dict[str, Any]]:
            adapt_family = make_family("lasso", sigma=float(adapt_sigma))
            runs = []
            for r in range(args.runs):
                seed = derive_seed(0, "sweep", adapt_sigma, r)
                test_task = test_family.sample(gen("lasso-test", args.sweep_test_sigma, r))
                runs.append(runner.compare(adapt_family, test_task, r, seed, [k], methods=("M-L2O", "TL")))
            log(
                f"sweep: adapt sigma={adapt_sigma} "
                + ", ".join(f"{n}={fmt(v)}" for n, v in summarize(runs, "min").items())
            )
            return runs

        out[f"{adapt_sigma:g}"] = cached(args, f"sweep-test{args.sweep_test_sigma}-adapt{adapt_sigma:g}", compute)
    return out


def part_neural(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """A zoo optimizer adapted 5 steps on a digits CNN (unseen) vs unadapted vs validation-tuned Adam."""
    from torch.nn import functional as F

    from learned_optim.tasks import build_conv_net
    from learned_optim.tasks.data import load_splits

    splits = load_splits("digits")
    train, val, test = splits
    steps, batch = args.neural_steps, 128

    def model_for(seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(0, "cnn-init", seed))
            return build_conv_net(splits.image_shape, (16, 32), (3, 5), splits.num_classes, "relu", 2)

    def batches(seed: int, n: int):
        g = gen("cnn-batches", seed)
        for _ in range(n):
            idx = torch.randint(len(train.y), (batch,), generator=g)
            yield train.x[idx], train.y[idx]

    def run(
        make_opt: Callable[[torch.nn.Module], torch.optim.Optimizer], seed: int, adapt_steps: int = 0
    ) -> dict[str, Any]:
        model = model_for(seed)
        opt = make_opt(model)
        if adapt_steps:
            learned_optim.adapt(
                opt,
                model,
                F.cross_entropy,
                list(batches(10_000 + seed, adapt_steps * 21)),
                steps=adapt_steps,
                unroll=20,
                lr=args.adapt_lr,
            )
        losses = []
        for x, y in batches(seed, steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            val_loss = float(F.cross_entropy(model(val.x), val.y))
            acc = float((model(test.x).argmax(1) == test.y).float().mean())
        tail = [v for v in losses[-20:] if math.isfinite(v)]
        return {
            "final_train_loss": sum(tail) / len(tail) if tail else math.nan,
            "val_loss": val_loss,
            "test_accuracy": acc,
            "curve": [round(v, 4) for v in losses],
        }

    seeds = list(range(args.runs))
    tune_seeds = [1000, 1001]
    grid = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3]
    scores = {}
    for lr in grid:
        vals = [run(lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr=lr), s)["val_loss"] for s in tune_seeds]
        scores[lr] = sum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else math.inf
    best = min(scores, key=scores.get)
    log(f"neural: Adam lr grid {scores} -> {best}")
    out: dict[str, Any] = {"optimizer": name, "steps": steps, "adam_lr": best, "adam_grid": scores, "runs": []}
    for s in seeds:
        row = {
            f"{name} (no adapt)": run(lambda m: learned_optim.from_pretrained(name, m.parameters()), s),
            f"{name} adapted 5": run(lambda m: learned_optim.from_pretrained(name, m.parameters()), s, adapt_steps=5),
            f"Adam (lr {best:g})": run(lambda m: torch.optim.Adam(m.parameters(), lr=best), s),
        }
        out["runs"].append(row)
        log(
            f"neural: seed {s} "
            + ", ".join(f"{k}: loss {v['final_train_loss']:.4f} acc {v['test_accuracy']:.3f}" for k, v in row.items())
        )
    return out


# ------------------------------------------------------------------------------------------ reporting
def band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    stats = [mean_confidence_interval(col) for col in zip(*curves, strict=True)]
    mean = [m for m, _ in stats]
    half = [h if math.isfinite(h) else 0.0 for _, h in stats]
    return mean, [m - h for m, h in zip(mean, half, strict=True)], [m + h for m, h in zip(mean, half, strict=True)]


def plot_curves(runs: list[dict[str, Any]], names: Sequence[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        curves = [r[name]["curve"] for r in runs if name in r and "curve" in r[name]]
        if not curves:
            continue
        mean, lo, hi = band(curves)
        steps = range(len(mean))
        ax.plot(steps, mean, label=name)
        ax.fill_between(steps, lo, hi, alpha=0.2)
    ax.set_xlabel("test step")
    ax.set_ylabel("log10 loss (mean, 95% CI)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweep: dict[str, Any], test_sigma: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = [float(s) for s in sweep]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({k for runs in sweep.values() for r in runs for k in r})
    for name in names:
        stats = [mean_confidence_interval([r[name]["min"] for r in runs]) for runs in sweep.values()]
        ax.errorbar(sigmas, [m for m, _ in stats], yerr=[h for _, h in stats], marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("sigma of the adaptation tasks")
    ax.set_ylabel(f"min log10 loss on sigma={test_sigma:g} tests")
    ax.set_title("Adaptation distribution sweep (LASSO)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table_markdown(table: dict[str, Any], k: int, metric: str) -> list[str]:
    cols = [f"Vanilla/{k}", f"M-L2O/{k}", "DT", f"TL/{k}", "M-L2O (no adapt)"]
    lines = [
        "| sigma | Vanilla L2O | M-L2O | DT | TL | M-L2O (no adapt) | M-L2O - TL (paired) | M-L2O - DT (paired) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sigma, runs in table.items():
        s = summarize(runs, metric)
        lines.append(
            f"| {sigma} | "
            + " | ".join(fmt(s.get(c, (math.nan, math.nan))) for c in cols)
            + " | "
            + fmt(paired(runs, f"M-L2O/{k}", f"TL/{k}", metric))
            + " | "
            + fmt(paired(runs, f"M-L2O/{k}", "DT", metric))
            + " |"
        )
    return lines


def verdict(table: dict[str, Any], k: int) -> list[str]:
    lines = []
    for sigma, runs in table.items():
        if float(sigma) < 50:
            continue
        for other in (f"TL/{k}", "DT"):
            mean, half = paired(runs, f"M-L2O/{k}", other, "min")
            if not math.isfinite(mean):
                continue
            if mean + half < 0:
                word = "M-L2O better (95% CI of the paired difference below 0)"
            elif mean - half > 0:
                word = "M-L2O worse (95% CI above 0)"
            else:
                word = "no significant difference"
            lines.append(f"- sigma={sigma}, {k} steps, vs {other.split('/')[0]}: {mean:+.3f} ± {half:.3f} -> {word}")
    return lines


def write_report(out: Path, args: argparse.Namespace, parts: dict[str, Any], command: str) -> None:
    lines = [
        "# M-L2O on LASSO: reproduction of SPEC §4 (Table 1) and extras",
        "",
        "Generated by",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Optimizers: M-L2O = `{args.m_l2o}`, DT/TL = `{args.baseline}`, Vanilla = RNNProp at random init "
        f"(a different init per run). Adaptation: Adam lr {args.adapt_lr:g} on the net's weights, one "
        f"{args.segment}-step segment per step, adaptation instances renewed every {args.adapt_trajectory} steps. "
        f"Test: {args.test_steps} steps on a held-out instance; {args.runs} runs; mean ± 95% t-interval half-width; "
        "the paired columns are the mean over runs of the per-run difference (same adaptation and test "
        "instances), negative = M-L2O better.",
        "",
    ]
    table = parts.get("table")
    if table:
        optimum = parts.get("optimum", {})
        lines += [
            "Exact optimum of the test instances (LARS-lasso), log10 f*: "
            + ", ".join(f"sigma={s}: {fmt(mean_confidence_interval(v))}" for s, v in optimum.items())
            + ". The LASSO minimum is not 0, so min log10 loss is bounded below by log10 f*; the 'gap' "
            "tables give log10(min_t f_t - f*).",
            "",
        ]
        for k in args.adapt_steps:
            for metric, label in (
                ("min", "Minimum log10 loss"),
                ("gap", "log10 of the optimality gap (min_t f_t - f*)"),
                ("mean", "Mean log10 loss"),
            ):
                lines += [f"## {label} over the {args.test_steps} test steps, {k} adaptation steps", ""]
                lines += table_markdown(table, k, metric) + [""]
            lines += [
                f"Adaptation gain (log10 loss decrease from adapting, paired, {k} steps; larger = adapts more): ",
                "",
                "| sigma | M-L2O: no adapt -> adapted | TL: DT -> adapted |",
                "|---|---|---|",
            ]
            for sigma, runs in table.items():
                lines.append(
                    f"| {sigma} | {fmt(paired(runs, 'M-L2O (no adapt)', f'M-L2O/{k}', 'min'))} | "
                    f"{fmt(paired(runs, 'DT', f'TL/{k}', 'min'))} |"
                )
            lines += [""]
            lines += [f"Claim check (M-L2O beats TL and DT at sigma >= 50, min log10 loss, {k} steps):", ""]
            lines += verdict(table, k) + [""]
        lines += [
            "Paper (SPEC §4, min log10 loss, 5 steps; Vanilla / M-L2O / DT / TL): "
            + "; ".join(f"sigma={s}: " + " / ".join(f"{v:.3f}" for v in vals) for s, vals in PAPER.items()),
            "",
        ]
        for sigma in args.curve_sigmas:
            if str(sigma) in table:
                lines.append(f"![LASSO sigma={sigma}](lasso_sigma{sigma}.png)")
        lines.append("")
    ros = parts.get("rosenbrock")
    if ros:
        k = args.adapt_steps[0]
        s_min, s_mean = summarize(ros["runs"], "min"), summarize(ros["runs"], "mean")
        at = min(500, args.test_steps)
        s_at = {n: mean_confidence_interval([r[n]["curve"][at] for r in ros["runs"] if n in r]) for n in s_min}
        lines += [
            f"## Rosenbrock transfer (trained on LASSO; adapted {k} steps on and tested on 2-D Rosenbrock, "
            "x0 ~ N(0, 1), 128 instances)",
            "",
            f"| method | min log10 loss | mean log10 loss | log10 loss at step {at} |",
            "|---|---|---|---|",
        ]
        lines += [f"| {n} | {fmt(s_min[n])} | {fmt(s_mean[n])} | {fmt(s_at[n])} |" for n in s_min]
        lines += ["", "![Rosenbrock](rosenbrock.png)", ""]
    sweep = parts.get("sweep")
    if sweep:
        k = args.adapt_steps[0]
        names = sorted({n for runs in sweep.values() for r in runs for n in r})
        lines += [
            f"## Adaptation-distribution sweep: test sigma = {args.sweep_test_sigma}, adaptation sigma varies "
            f"({k} steps; min log10 loss)",
            "",
            "| adaptation sigma | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for s, runs in sweep.items():
            st = summarize(runs, "min")
            lines.append(f"| {s} | " + " | ".join(fmt(st[n]) for n in names) + " |")
        lines += ["", "![sweep](sweep.png)", ""]
    for neural in parts.get("neural", []):
        names = list(neural["runs"][0])
        lines += [
            f"## Neural case: `{neural['optimizer']}` on a digits CNN (conv 3x3x16, conv 5x5x32, max-pool, FC; "
            f"unseen in meta-training), {neural['steps']} training steps, batch 128",
            "",
            f"Adam's lr was tuned on the validation loss over {sorted(float(v) for v in neural['adam_grid'])} "
            f"-> {neural['adam_lr']:g}. "
            "Adaptation: `learned_optim.adapt(opt, model, F.cross_entropy, batches, steps=5, unroll=20)` "
            "from the model's initial weights on 105 extra training batches.",
            "",
            "| optimizer | final train loss (last 20 steps) | test accuracy |",
            "|---|---|---|",
        ]
        for n in names:
            lines.append(
                f"| {n} | {fmt(mean_confidence_interval([r[n]['final_train_loss'] for r in neural['runs']]))} | "
                f"{fmt(mean_confidence_interval([r[n]['test_accuracy'] for r in neural['runs']]))} |"
            )
        lines += [""]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def card_section(args: argparse.Namespace, parts: dict[str, Any], command: str) -> tuple[str, dict[str, Any]]:
    """The model cards' evaluation section (markdown) and the ``training.results`` summary."""
    table = parts["table"]
    lines = [
        "## Evaluation",
        "",
        "M-L2O LASSO benchmark (SPEC §4), measured by (from the repository root):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Test: {args.test_steps} steps on held-out LASSO instances (d=10, 128 instances, W ~ N(0, sigma^2), "
        f"far outside the training range sigma in [0.1, 1]); {args.runs} runs, mean ± 95% CI. Adaptation: K Adam "
        f"(lr {args.adapt_lr:g}) steps on the net's weights, each on a {args.segment}-step segment of other "
        "instances of the same sigma. M-L2O = `m-l2o` adapted, TL = `rnnprop-lasso` adapted, DT = "
        "`rnnprop-lasso` as is, Vanilla = a random RNNProp adapted. Paired = mean per-run difference "
        "(negative: M-L2O better).",
        "",
    ]
    results: dict[str, Any] = {
        "command": command,
        "runs": args.runs,
        "test_steps": args.test_steps,
        "min_log10_loss": {},
    }
    for k in args.adapt_steps:
        lines += [f"Minimum log10 loss, K = {k} adaptation steps:", ""] + table_markdown(table, k, "min") + [""]
        lines += verdict(table, k) + [""]
        if any("gap" in m for runs in table.values() for row in runs for m in row.values()):
            lines += [f"log10 of the optimality gap min_t f_t - f* (f* exact, by LARS), K = {k}:", ""]
            lines += table_markdown(table, k, "gap") + [""]
        results["min_log10_loss"][f"{k}_adaptation_steps"] = {
            sigma: {
                name.split("/")[0]: [round(v, 4) for v in mean_ci]
                for name, mean_ci in summarize(runs, "min").items()
                if "/" not in name or name.endswith(f"/{k}")
            }
            for sigma, runs in table.items()
        }
    lines += [
        "Curves, the mean log10 loss, the Rosenbrock transfer, the adaptation-distribution sweep and the "
        "neural case: `examples/figures/m_l2o/README.md`.",
        "",
    ]
    return "\n".join(lines), results


def update_cards(args: argparse.Namespace, parts: dict[str, Any], command: str) -> None:
    """Write the measured results into the zoo folders of ``--m-l2o`` and ``--baseline`` (card + config.json)."""
    from learned_optim.hub import resolve_checkpoint, zoo_dir

    section, results = card_section(args, parts, command)
    for name in (args.m_l2o, args.baseline):
        folder = resolve_checkpoint(name)
        if zoo_dir().resolve() not in folder.resolve().parents:
            log(f"not a bundled zoo folder, card not updated: {folder}")
            continue
        card = (folder / "README.md").read_text()
        head, sep, tail = card.partition("## Evaluation\n")
        if sep:
            rest = tail.split("\n## ", 1)
            tail = "## " + rest[1] if len(rest) > 1 else ""
        (folder / "README.md").write_text(head + section + ("\n" + tail if tail else ""))
        config = json.loads((folder / "config.json").read_text())
        config["training"]["results"] = {"m_l2o_lasso_benchmark": results}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        log(f"updated the card and config.json of {folder}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m-l2o", default="m-l2o", help="M-L2O optimizer (zoo name or folder)")
    parser.add_argument("--baseline", default="rnnprop-lasso", help="normally meta-trained optimizer for DT/TL")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["table", "rosenbrock", "sweep", "neural"],
        choices=["table", "rosenbrock", "sweep", "neural"],
    )
    parser.add_argument("--sigmas", nargs="+", type=int, default=[10, 25, 50, 100, 200])
    parser.add_argument("--adapt-steps", nargs="+", type=int, default=[5, 50])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--test-steps", type=int, default=1000)
    parser.add_argument("--adapt-lr", type=float, default=1e-3)
    parser.add_argument("--segment", type=int, default=20)
    parser.add_argument("--adapt-trajectory", type=int, default=200)
    parser.add_argument("--curve-sigmas", nargs="+", type=int, default=[10, 50, 200])
    parser.add_argument("--sweep-test-sigma", type=int, default=100)
    parser.add_argument("--sweep-adapt-sigmas", nargs="+", type=float, default=[1, 10, 25, 50, 100, 200])
    parser.add_argument(
        "--neural-optimizer",
        nargs="+",
        default=["m-l2o", "rnnprop"],
        help="zoo optimizers for the neural case (rnnprop: RNNProp meta-trained on digits MLPs)",
    )
    parser.add_argument("--neural-steps", type=int, default=300)
    parser.add_argument("--out", default="examples/figures/m_l2o")
    parser.add_argument("--recompute", action="store_true", help="recompute parts whose JSON exists")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 runs, 50 test steps, 2 sigmas")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--update-cards",
        action="store_true",
        help="write the table into the model cards and config.json of the two zoo folders",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.test_steps, args.sigmas, args.adapt_steps = 2, 50, [10, 200], [2]
        args.curve_sigmas, args.sweep_adapt_sigmas, args.neural_steps = [10], [1, 100], 20
        args.out = args.out + "-quick"
    torch.set_num_threads(args.threads)
    command = "python examples/m_l2o_lasso.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args) if any(p in args.parts for p in ("table", "rosenbrock", "sweep")) else None
    parts: dict[str, Any] = {}
    for part in args.parts:
        started = time.perf_counter()
        log(f"{part}: running (re-using saved pieces in {out / 'parts'})")
        if part == "table":
            parts[part] = with_gap(part_table(runner, args), part_optimum(args))
            parts["optimum"] = part_optimum(args)
        elif part == "rosenbrock":
            parts[part] = cached(args, "rosenbrock", lambda: part_rosenbrock(runner, args))
        elif part == "sweep":
            parts[part] = part_sweep(runner, args)
        else:
            parts[part] = [
                cached(args, f"neural-{Path(name).name}", lambda name=name: part_neural(args, name))
                for name in args.neural_optimizer
            ]
        log(f"{part}: done in {time.perf_counter() - started:.0f}s")
    if "table" in parts:
        for sigma in args.curve_sigmas:
            if str(sigma) in parts["table"]:
                k = args.adapt_steps[0]
                plot_curves(
                    parts["table"][str(sigma)],
                    [f"Vanilla/{k}", f"M-L2O/{k}", "DT", f"TL/{k}"],
                    f"LASSO sigma={sigma}, {k} adaptation steps",
                    out / f"lasso_sigma{sigma}.png",
                )
    if "rosenbrock" in parts:
        k = args.adapt_steps[0]
        plot_curves(
            parts["rosenbrock"]["runs"],
            [f"Vanilla/{k}", f"M-L2O/{k}", "DT", f"TL/{k}"],
            f"Rosenbrock (trained on LASSO), {k} adaptation steps",
            out / "rosenbrock.png",
        )
    if "sweep" in parts:
        plot_sweep(parts["sweep"], args.sweep_test_sigma, out / "sweep.png")
    write_report(out, args, parts, command)
    if args.update_cards and "table" in parts:
        update_cards(args, parts, command.replace(" --update-cards", ""))
    log(f"report written to {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
