r"""Train-by-train vs train-by-validation when learning the step size of GD on noisy least squares.

SPEC §5, second bullet (Wang, Yuan, Wu & Ge, ICML 2021, Section 4, Theorems 5-6, Figures 2-3).

Task distribution: :math:`w^*` uniform on the unit sphere of :math:`\mathbb R^{d}`, :math:`d = 1000`;
:math:`n` samples :math:`x \sim N(0, I_d)`, :math:`y = \langle w^*, x\rangle + \xi`,
:math:`\xi \sim N(0, \sigma^2)`. The inner optimizer is GD from :math:`w_0 = 0` for :math:`t = 40` steps on
:math:`\hat f(w) = \frac1{2n_1}\|X_{tr} w - y_{tr}\|^2`, with the divergence guard: once
:math:`\|w_\tau\| \ge 40\sigma` the run is frozen at norm :math:`40\sigma` (which makes its meta-loss high).

* **Train-by-train (TbT)**: train on all :math:`n` samples, meta-loss = final training loss
  :math:`\frac1{2n}\|X w_t - y\|^2` on the same samples.
* **Train-by-validation (TbV)**: train on :math:`n/2` samples, meta-loss = loss of :math:`w_t` on the
  other :math:`n/2` (the same total budget of samples).

For each, :math:`\eta` is chosen from 25 values in ``logspace(-6, 0)`` by averaging the meta-loss over
300 sampled tasks (the same tasks for both). The chosen :math:`\eta` is then tested on 10 fresh tasks,
each approach training on the data it was meta-trained with (TbT on all :math:`n`, TbV on :math:`n/2`);
also shown: the TbV :math:`\eta` used to train on all :math:`n` samples (how the reference code tests).

**Test RMSE** is the distance :math:`\|w_t - w^*\|`, i.e. the square root of the excess population
risk :math:`E_x\langle w_t - w^*, x\rangle^2` (:math:`x` is isotropic). The RMSE a large fresh test set
would show is :math:`\sqrt{\|w_t-w^*\|^2 + \sigma^2}`; it is stored in the JSON as ``pop_rmse``.
The zero predictor has test RMSE :math:`\|w^*\| = 1`. **Train RMSE** is
:math:`\sqrt{\frac1{n_1}\|X_{tr}w_t - y_{tr}\|^2}` on the task's own training samples.

Claims checked (and printed as holding or not): TbV has lower test RMSE than TbT; the gap
(TbT − TbV) grows with :math:`\sigma` at :math:`n = 500`; the gap shrinks as :math:`n` grows at
:math:`\sigma = 1`.

GD for all 25 step sizes and a chunk of tasks runs at once, in the eigenbasis of each task's
:math:`X^\top X` (exactly the GD iterates; see :func:`learned_optim.meta.stepsize.gd_least_squares`).

Run::

    python examples/train_by_validation.py          # writes examples/figures/train_by_validation.{png,json}
    python examples/train_by_validation.py --quick  # smoke run (d = 100, seconds)

What the committed figure shows (seed 0): TbV is better from sigma = 1 up (gap 0.28, 1.14, 3.18 at
sigma = 1, 2, 4, every test task), but TbT is better at sigma = 0.1 and 0.5, where fitting the noise
costs little and TbT trains on twice the samples. At sigma = 1 the gap is not monotone in n: it peaks
at n = d = 1000 (the interpolation threshold, where the ERM TbT converges to is worst), then closes
and reverses by n = 4000 (TbT 0.58 vs TbV 0.65; the ERM error sqrt(d sigma^2/(n - d)) = 0.58).

Cost: one Gram matrix per task (:math:`\min(n,d)^2\max(n,d)` flops) and :math:`40 \times 25` batched
GD steps. On the shared 2-core machine under a load of ~8-12 (``nice -n 10``) the :math:`n = 500`
configurations took 3-4 min each, :math:`n = 1000` 11 min, :math:`n = 2000` 13 min, :math:`n = 4000`
~30 min; on an idle machine expect a fraction of that. ``--reuse OLD.json`` skips configurations
already computed with the same settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import pairwise
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from learned_optim.meta.stepsize import (  # noqa: E402
    GUARD_FACTOR,
    gd_least_squares,
    half_mse,
    sample_least_squares_tasks,
    split_task,
)

FIGURES = Path(__file__).resolve().parent / "figures"
MODES = ("tbt", "tbv")


def config_seed(base: int, n: int, sigma: float, salt: int) -> int:
    """A reproducible seed per (n, sigma) configuration; ``salt`` separates meta-training from testing."""
    return (base * 1_000_003 + n * 7_919 + round(sigma * 1000) * 104_729 + salt) % (2**62)


def meta_objectives(
    n: int, d: int, sigma: float, etas: torch.Tensor, t: int, num_tasks: int, chunk: int, seed: int
) -> dict:
    """Average meta-loss (and fraction of guarded runs) over ``num_tasks`` tasks for each η and mode."""
    gen = torch.Generator().manual_seed(seed)
    guard = GUARD_FACTOR * sigma
    total = {m: torch.zeros(len(etas), dtype=torch.float64) for m in MODES}
    diverged = {m: torch.zeros(len(etas), dtype=torch.float64) for m in MODES}
    done = 0
    while done < num_tasks:
        b = min(chunk, num_tasks - done)
        X, y, _ = sample_least_squares_tasks(b, n, d, sigma, gen)
        for mode in MODES:
            X_tr, y_tr, X_meta, y_meta = split_task(X, y, mode)
            w, div = gd_least_squares(X_tr, y_tr, etas, t, guard)
            total[mode] += half_mse(w, X_meta, y_meta).sum(0)
            diverged[mode] += div.double().sum(0)
        done += b
    return {
        m: {"meta_objective": (total[m] / num_tasks).tolist(), "diverged_fraction": (diverged[m] / num_tasks).tolist()}
        for m in MODES
    }


def test_step_sizes(
    n: int, d: int, sigma: float, t: int, eta_tbt: float, eta_tbv: float, num_tasks: int, seed: int
) -> dict:
    """Test RMSE (‖w_t − w*‖), population RMSE and train RMSE of the chosen η's on fresh tasks."""
    gen = torch.Generator().manual_seed(seed)
    X, y, w_star = sample_least_squares_tasks(num_tasks, n, d, sigma, gen)
    guard = GUARD_FACTOR * sigma
    results = {}
    for label, mode, eta in (("TbT", "tbt", eta_tbt), ("TbV", "tbv", eta_tbv), ("TbV eta, all n", "tbt", eta_tbv)):
        X_tr, y_tr, _, _ = split_task(X, y, mode)
        w, div = gd_least_squares(X_tr, y_tr, [eta], t, guard)
        dist = (w[:, 0] - w_star).norm(dim=-1)
        train_rmse = (2 * half_mse(w, X_tr, y_tr)[:, 0]).sqrt()
        results[label] = {
            "eta": eta,
            "n_train": X_tr.shape[-2],
            "test_rmse": dist.tolist(),
            "pop_rmse": (dist**2 + sigma**2).sqrt().tolist(),
            "train_rmse": train_rmse.tolist(),
            "diverged": div[:, 0].tolist(),
        }
    return results


def summary(values: list[float]) -> tuple[float, float, float]:
    v = torch.tensor(values)
    return float(v.mean()), float(v.min()), float(v.max())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d", type=int, default=1000)
    p.add_argument("--t", type=int, default=40)
    p.add_argument("--tasks", type=int, default=300, help="meta-training tasks per configuration")
    p.add_argument("--test-tasks", type=int, default=10)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0, 4.0])
    p.add_argument("--sigma-n", type=int, default=500, help="n used in the sigma sweep")
    p.add_argument("--ns", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    p.add_argument("--n-sigma", type=float, default=1.0, help="sigma used in the n sweep")
    p.add_argument("--grid", type=int, default=25, help="number of step sizes in logspace(-6, 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=FIGURES)
    p.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a previous output JSON: configurations it holds with identical settings are not recomputed",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke run (d=100)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.tasks, args.test_tasks, args.sigma_n = 100, 20, 4, 50
        args.sigmas, args.ns = [0.5, 2.0], [50, 200]
    start = time.time()
    etas = torch.logspace(-6, 0, args.grid, dtype=torch.float64)
    configs = [(args.sigma_n, s) for s in args.sigmas] + [(n, args.n_sigma) for n in args.ns]
    configs = list(dict.fromkeys(configs))
    out: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "etas": etas.tolist(),
        "results": [],
    }
    print(
        f"d={args.d}, t={args.t}, {args.tasks} meta-training tasks, {args.test_tasks} test tasks, "
        f"eta grid = {args.grid} points in logspace(-6, 0), guard ||w|| >= {GUARD_FACTOR:g} sigma"
    )
    same = ("d", "t", "tasks", "test_tasks", "grid", "seed")
    reusable = {}
    if args.reuse is not None and args.reuse.exists():
        old = json.loads(args.reuse.read_text())
        if all(old["config"].get(k) == out["config"][k] for k in same):
            reusable = {(r["n"], r["sigma"]): r for r in old["results"]}
        else:
            print(f"not reusing {args.reuse}: settings differ")
    for n, sigma in configs:
        if (n, sigma) in reusable:
            row = reusable[(n, sigma)]
            out["results"].append(row)
            print(f"  n={n:5d} sigma={sigma:4g}: reused from {args.reuse}")
            continue
        t0 = time.time()
        chunk = max(1, min(25, 12_500 // n))
        meta = meta_objectives(n, args.d, sigma, etas, args.t, args.tasks, chunk, config_seed(args.seed, n, sigma, 1))
        chosen = {m: float(etas[int(torch.tensor(meta[m]["meta_objective"]).argmin())]) for m in MODES}
        test = test_step_sizes(
            n, args.d, sigma, args.t, chosen["tbt"], chosen["tbv"], args.test_tasks, config_seed(args.seed, n, sigma, 2)
        )
        row = {"n": n, "sigma": sigma, "meta": meta, "eta_tbt": chosen["tbt"], "eta_tbv": chosen["tbv"], "test": test}
        for r in test.values():
            r["test_rmse_mean"], r["test_rmse_min"], r["test_rmse_max"] = summary(r["test_rmse"])
            r["train_rmse_mean"] = summary(r["train_rmse"])[0]
            r["pop_rmse_mean"] = summary(r["pop_rmse"])[0]
        row["gap"] = test["TbT"]["test_rmse_mean"] - test["TbV"]["test_rmse_mean"]
        row["tbv_wins"] = sum(a > b for a, b in zip(test["TbT"]["test_rmse"], test["TbV"]["test_rmse"], strict=True))
        row["seconds"] = time.time() - t0
        out["results"].append(row)
        print(
            f"  n={n:5d} sigma={sigma:4g}: eta_TbT={chosen['tbt']:.3g} eta_TbV={chosen['tbv']:.3g}  "
            f"test RMSE TbT={test['TbT']['test_rmse_mean']:.3f} TbV={test['TbV']['test_rmse_mean']:.3f}  "
            f"({row['seconds']:.0f}s)",
            flush=True,
        )

    def find(n, sigma):
        return next(r for r in out["results"] if r["n"] == n and r["sigma"] == sigma)

    def table(rows, title):
        print(f"\n{title}")
        hdr = (
            f"{'n':>5s} {'sigma':>5s} {'eta_TbT':>8s} {'eta_TbV':>8s} | {'TbT test RMSE [min,max]':>24s} "
            f"{'TbV test RMSE [min,max]':>24s} {'gap':>7s} {'wins':>5s} | {'TbV-eta all n':>13s} | "
            f"{'train TbT':>9s} {'train TbV':>9s} | {'div TbT':>7s} {'div TbV':>7s}"
        )
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            a, b, c = r["test"]["TbT"], r["test"]["TbV"], r["test"]["TbV eta, all n"]
            i_t, i_v = out["etas"].index(r["eta_tbt"]), out["etas"].index(r["eta_tbv"])
            print(
                f"{r['n']:5d} {r['sigma']:5g} {r['eta_tbt']:8.3g} {r['eta_tbv']:8.3g} | "
                f"{a['test_rmse_mean']:8.3f} [{a['test_rmse_min']:.3f},{a['test_rmse_max']:.3f}]"
                f" {b['test_rmse_mean']:8.3f} [{b['test_rmse_min']:.3f},{b['test_rmse_max']:.3f}]"
                f" {r['gap']:7.3f} {r['tbv_wins']:>2d}/{len(a['test_rmse']):<2d} | {c['test_rmse_mean']:13.3f} | "
                f"{a['train_rmse_mean']:9.3f} {b['train_rmse_mean']:9.3f} | "
                f"{r['meta']['tbt']['diverged_fraction'][i_t]:7.2f} "
                f"{r['meta']['tbv']['diverged_fraction'][i_v]:7.2f}"
            )

    sig_rows = [find(args.sigma_n, s) for s in args.sigmas]
    n_rows = [find(n, args.n_sigma) for n in args.ns]
    print(
        "\ntest RMSE = ||w_t - w*|| = sqrt(excess risk), mean over test tasks [min, max]; gap = TbT - TbV; "
        "wins = test tasks where TbV < TbT;\n'TbV-eta all n' = TbV's eta used to train on all n samples; "
        "train = train RMSE; div = fraction of meta-training tasks hitting the guard at the chosen eta"
    )
    table(
        sig_rows,
        f"sigma sweep, n = {args.sigma_n} (TbT: {args.sigma_n}, TbV: {args.sigma_n // 2} + "
        f"{args.sigma_n - args.sigma_n // 2})",
    )
    table(n_rows, f"n sweep, sigma = {args.n_sigma:g} (TbV splits n evenly)")

    # ---- the claims -------------------------------------------------------------------------
    claims = {}
    lower = [(r["n"], r["sigma"]) for r in out["results"] if r["gap"] > 0]
    claims["TbV lower test RMSE in every configuration"] = {
        "holds": len(lower) == len(out["results"]),
        "detail": f"{len(lower)}/{len(out['results'])} configurations; not in "
        f"{[(r['n'], r['sigma']) for r in out['results'] if r['gap'] <= 0]}",
    }
    sig_gaps = [r["gap"] for r in sig_rows]
    claims["gap grows with sigma"] = {
        "holds": all(b > a for a, b in pairwise(sig_gaps)),
        "detail": "gaps " + ", ".join(f"sigma={s:g}: {g:.3f}" for s, g in zip(args.sigmas, sig_gaps, strict=True)),
    }
    n_gaps = [r["gap"] for r in n_rows]
    claims["gap shrinks with n"] = {
        "holds": all(b < a for a, b in pairwise(n_gaps)),
        "detail": "gaps " + ", ".join(f"n={n}: {g:.3f}" for n, g in zip(args.ns, n_gaps, strict=True)),
    }
    out["claims"] = claims
    print("\nclaims:")
    for name, cl in claims.items():
        print(f"  [{'holds' if cl['holds'] else 'DOES NOT HOLD'}] {name}: {cl['detail']}")

    out["seconds"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "train_by_validation" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.out / (stem + '.json')}")
    if not args.no_plot:
        plot(out, sig_rows, n_rows, args, args.out / f"{stem}.png")
        print(f"wrote {args.out / (stem + '.png')}")
    print(f"total {out['seconds']:.0f}s")
    return out


def plot(out, sig_rows, n_rows, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, rows, key, xlabel, title in (
        (axes[0], sig_rows, "sigma", "noise sigma", f"(a) n = {args.sigma_n}"),
        (axes[1], n_rows, "n", "samples n", f"(b) sigma = {args.n_sigma:g}"),
    ):
        x = [r[key] for r in rows]
        for label, color in (("TbT", "C0"), ("TbV", "C1"), ("TbV eta, all n", "C2")):
            m = [r["test"][label]["test_rmse_mean"] for r in rows]
            lo = [mm - r["test"][label]["test_rmse_min"] for mm, r in zip(m, rows, strict=True)]
            hi = [r["test"][label]["test_rmse_max"] - mm for mm, r in zip(m, rows, strict=True)]
            ls = "--" if label == "TbV eta, all n" else "-"
            ax.errorbar(x, m, yerr=[lo, hi], fmt="o" + ls, color=color, capsize=3, label=f"{label} test")
            if label != "TbV eta, all n":
                ax.plot(
                    x, [r["test"][label]["train_rmse_mean"] for r in rows], "x:", color=color, label=f"{label} train"
                )
        ax.axhline(1.0, color="gray", lw=0.8, ls=":", label="w = 0")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("RMSE (test: ||w_t - w*||)")
        ax.set_title(f"{title}: test RMSE mean [min,max] over {args.test_tasks} tasks", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[2]
    etas = out["etas"]
    for i, r in enumerate(sig_rows):
        for mode, ls in (("tbt", "-"), ("tbv", "--")):
            ax.plot(
                etas, r["meta"][mode]["meta_objective"], ls, color=f"C{i}", label=f"{mode.upper()} sigma={r['sigma']:g}"
            )
            j = etas.index(r[f"eta_{mode}"])
            ax.plot(etas[j], r["meta"][mode]["meta_objective"][j], "o", color=f"C{i}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eta")
    ax.set_ylabel("meta-objective (mean over tasks)")
    ax.set_title(f"(c) meta-objectives, n = {args.sigma_n}; dots = chosen eta", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
