"""Optimizer step time of every learned optimizer family vs torch.optim.Adam and vs a plain eager reference.

::

    python benchmarks/step_time.py                      # 1M and 10M parameters, every family
    python benchmarks/step_time.py --sizes 1M --families dm_lstm --no-memory
    python benchmarks/step_time.py --device cuda --sizes 1M 10M 100M     # GPU: Adam, eager, compiled
    python benchmarks/step_time.py --sizes 1M --families adafac_mlp --vector     # a 1-D tensor (a flat parameter)
    python benchmarks/step_time.py --sizes 1M --families adafac_mlp --columns 10   # a narrow (100k, 10) matrix
    python benchmarks/step_time.py --sizes 1M --families adafac_mlp --net newton_schulz_steps=5   # a net setting

For each family and size (one parameter tensor of that many coordinates, a fixed gradient) it times,
round-robin in the same process (see ``benchmarks/_common.py``):

* ``Adam``: ``torch.optim.Adam`` with its defaults;
* ``eager``: ``LearnedOptimizer(rule)`` (chunked, in-place fast path; the native kernels of
  :mod:`learned_optim.kernels` where their guard measured them faster than ATen on this machine: the default);
* ``kernels``: the same with the native kernels forced on (``kernels.forced()``), whatever the guard says;
* ``ATen``: the same with the native kernels switched off (``LEARNED_OPTIM_KERNELS=0``): ATen ops only;
* ``compiled``: ``LearnedOptimizer(rule, compile=True)`` (``torch.compile`` of the same forward);
* ``reference``: the same net written the plain eager way, kept here as the baseline: ``nn.LSTM``
  over all coordinates at once for DM-LSTM/RNNProp (per 1M-coordinate block above 1M, which a plain
  implementation would need to fit in memory), and for the MLP net its original formulation
  (normalised features concatenated with the time features, ``nn.Sequential``) unchunked. Its output
  is checked against the rule's.

It also prints the achieved GFLOP/s of the step (the net's GEMM FLOPs, counted by dispatch, over the
step time) against the measured GEMM throughput of the machine in the same run (the compute limit),
the time of the step's GEMMs alone at their real shapes, optimizer-state bytes per parameter, and
the peak transient memory of one step (peak RSS over the step minus RSS before it, each in a fresh
subprocess with glibc's mmap threshold fixed so freed buffers are returned to the OS).

With ``--device cuda`` the parameter, its gradient, the net and the state live on the GPU; the columns
are Adam, eager and compiled (the native kernels, the eager reference and the RSS measurement are CPU
only), the clock is the synchronised wall time and the compute limit is the GPU's float32 GEMM rate.

The header prints the CPU's instruction sets, the kernels' build (``LEARNED_OPTIM_ISA`` picks another one
the CPU runs) and :func:`learned_optim.kernels.report` (the guard's verdict per kernel). To measure an
AVX2-only machine's situation on an AVX-512 one, cap ATen and MKL too:
``LEARNED_OPTIM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (
    GemmRecorder,
    clock_name,
    gemm_only_seconds,
    machine_header,
    matmul_gflops,
    measure,  # noqa: E402
    peak_rss_kib,
    reset_peak_rss,
    table,
)

import learned_optim  # noqa: E402
from learned_optim import LearnedOptimizer, kernels  # noqa: E402
from learned_optim.features import (
    adam_ratio_features,
    bias_corrected,
    ema,
    log_and_sign,
    rsqrt_features,  # noqa: E402
    time_features,
)
from learned_optim.meta.cli import add_net_settings_option, net_settings  # noqa: E402

FAMILIES = ["dm_lstm", "rnnprop", "mlp", "adafac_mlp"]
REFERENCE_BLOCK = 1 << 20
FLOP_COUNT_CHUNK = 8192


def isa_line() -> str:
    """The CPU's vector instruction sets as the kernels see them, and the kernels' build."""
    return f"CPU runs {'/'.join(kernels.supported_isas())}, kernels built for {kernels.isa() or 'none'}"


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def make_rule(family: str):
    torch.manual_seed(0)
    return learned_optim.FAMILIES[family](**NET_SETTINGS).requires_grad_(False)


#: ``--net FIELD=VALUE``: net settings every timed family is built with (e.g. ``newton_schulz_steps=5``).
NET_SETTINGS: dict[str, Any] = {}


#: ``--columns C``: time whole-tensor rules on an ``(n / C, C)`` matrix instead of the squarest one: ``--vector``
#: (C = 1: a large bias, a flat FSDP parameter, whose factored statistics are per coordinate) or a narrow matrix
#: (C under the vector width: a partial vector per row). ``None``: the squarest matrix.
COLUMNS: int | None = None


def param_shape(family: str, n: int) -> tuple[int, ...]:
    """One tensor of ``n`` coordinates: a vector for the coordinatewise nets, the squarest matrix with ``n`` entries
    for whole-tensor rules (their factored statistics and μP scale read the shape), or :data:`COLUMNS` columns."""
    if not learned_optim.FAMILIES[family].whole_tensor:
        return (n,)
    if COLUMNS is not None:
        if n % COLUMNS:
            raise SystemExit(f"--columns {COLUMNS} does not divide the size {n}")
        return (n,) if COLUMNS == 1 else (n // COLUMNS, COLUMNS)
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return (rows, n // rows)


def make_param(n: int, family: str = "mlp", device: str | torch.device = "cpu") -> nn.Parameter:
    gen = torch.Generator().manual_seed(0)
    shape = param_shape(family, n)
    p = nn.Parameter((torch.randn(n, generator=gen) * 0.1).view(shape).to(device))
    grad = torch.randn(n, generator=gen) * 10 ** torch.randint(-5, -1, (n,), generator=gen).float()
    p.grad = grad.view(shape).to(device)
    return p


# ------------------------------------------------------------------------------------ eager references
class Reference:
    """The plain eager formulation of a family's net (the baseline), holding its own state."""

    def __init__(self, rule, p: nn.Parameter) -> None:
        self.rule, self.p, self.n = rule, p, p.numel()
        self.t = 0
        c = rule.config
        if rule.family == "dm_lstm":
            self.lstm = nn.LSTM(2, c.hidden_size, num_layers=c.num_layers)
            for i, cell in enumerate(rule.cells):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(self.lstm, f"{name}_l{i}").data.copy_(getattr(cell, name))
            self.h = torch.zeros(c.num_layers, self.n, c.hidden_size)
            self.c = torch.zeros(c.num_layers, self.n, c.hidden_size)
        elif rule.family == "rnnprop":
            self.lstm = nn.LSTM(c.hidden_size, c.hidden_size)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.lstm, f"{name}_l0").data.copy_(getattr(rule.cell, name))
            self.h = torch.zeros(1, self.n, c.hidden_size)
            self.c = torch.zeros(1, self.n, c.hidden_size)
            self.m, self.v = torch.zeros(self.n), torch.zeros(self.n)
        elif rule.family == "adafac_mlp":  # its one-shot formulation: all features of the tensor at once
            self.one_shot = copy.deepcopy(rule)
            self.one_shot.coordinate_block = self.n
            self.state = rule.init_state(self.n, shape=tuple(p.shape))
        else:
            d = len(c.decays)
            self.m, self.v = torch.zeros(self.n, d), torch.zeros(self.n, d)
        self.lstm = getattr(self, "lstm", None)
        if self.lstm is not None:
            self.lstm.requires_grad_(False)

    @torch.no_grad()
    def delta(self, grad: torch.Tensor, param: torch.Tensor, step: torch.Tensor, block: slice) -> torch.Tensor:
        rule, c = self.rule, self.rule.config
        if rule.family == "dm_lstm":
            x = log_and_sign(grad, c.preprocess_k).unsqueeze(0)
            out, (h, cc) = self.lstm(x, (self.h[:, block], self.c[:, block]))
            self.h[:, block], self.c[:, block] = h, cc
            return rule.head(out[0]).squeeze(-1) * c.output_scale
        if rule.family == "rnnprop":
            m = ema(self.m[block], grad, c.beta1)
            v = ema(self.v[block], grad.square(), c.beta2)
            self.m[block], self.v[block] = m, v
            x = adam_ratio_features(bias_corrected(m, c.beta1, step), bias_corrected(v, c.beta2, step), grad, c.eps)
            x = nn.functional.elu(rule.input(x)).unsqueeze(0)
            out, (h, cc) = self.lstm(x, (self.h[:, block], self.c[:, block]))
            self.h[:, block], self.c[:, block] = h, cc
            return torch.tanh(rule.head(out[0]).squeeze(-1)) * c.output_scale
        g = grad.unsqueeze(-1)
        m = ema(self.m[block], g, rule.decay)
        v = ema(self.v[block], g.square(), rule.decay)
        ratio, rs = rsqrt_features(m, v, c.moment_eps)
        features = torch.cat([g, param.unsqueeze(-1), m, v, ratio, rs], dim=-1)
        self.m[block], self.v[block] = m, v
        features = features * torch.rsqrt(features.square().mean(dim=0) + c.rms_eps)
        times = time_features(step, c.time_scales).expand(features.shape[0], -1)
        direction, magnitude = rule.mlp(torch.cat([features, times], dim=-1)).unbind(-1)
        return -direction * torch.exp(c.magnitude_scale * magnitude) * c.step_scale

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        step = torch.tensor(float(self.t))
        if self.rule.family == "adafac_mlp":
            flat = self.p.data.view(-1)
            with kernels.enabled_as(False):  # the ATen one-shot formulation, not the native kernel path
                delta, self.state = self.one_shot(self.p.grad.view(-1), flat, self.state, step, shape=self.p.shape)
            flat += self.rule.default_lr * delta  # its lr is a real learning rate (the others': 1.0)
            return
        flat, grad = self.p.data, self.p.grad
        # the MLP net's statistics are per tensor: one block; the LSTMs go per 1M block above 1M
        size = self.n if self.rule.family == "mlp" else REFERENCE_BLOCK
        for start in range(0, self.n, size):
            block = slice(start, min(start + size, self.n))
            flat[block] += self.delta(grad[block], flat[block], step, block)


def reference_agreement(family: str) -> float:
    """Max |delta_reference - delta_rule| over 3 steps on 10k coordinates (the baseline is the same net)."""
    rule = make_rule(family)
    p, q = make_param(10_000, family), make_param(10_000, family)
    ref, opt = Reference(rule, p), LearnedOptimizer([q], rule)
    worst = 0.0
    for _ in range(3):
        before_p, before_q = p.detach().clone(), q.detach().clone()
        ref.step()
        opt.step()
        worst = max(worst, float(((p.detach() - before_p) - (q.detach() - before_q)).abs().max()))
    return worst


# ------------------------------------------------------------------------------------ measurements
def state_bytes_per_param(opt: torch.optim.Optimizer, n: int) -> float:
    total = sum(
        v.nbytes for s in opt.state.values() for k, v in s.items() if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    return total / n


def flops_per_coordinate(family: str, chunk: int = FLOP_COUNT_CHUNK) -> tuple[float, list[tuple[int, int, int]]]:
    """GEMM FLOPs per coordinate, counted on the ATen path (the native kernels run the same GEMMs unseen)."""
    rule = make_rule(family)
    p = make_param(chunk, family)
    opt = LearnedOptimizer([p], rule, chunk_size=chunk)
    with kernels.enabled_as(False):
        opt.step()
        with GemmRecorder() as rec:
            opt.step()
    return rec.flops / chunk, rec.shapes


def child_memory(family: str, mode: str, n: int) -> dict:
    """(subprocess) peak transient RSS of one step after a warm-up step."""
    torch.set_num_threads(1)
    p = make_param(n, family)
    if mode == "adam":
        opt = torch.optim.Adam([p])
        step = opt.step
    elif mode == "reference":
        step = Reference(make_rule(family), p).step
    else:
        kernels.set_enabled(mode != "aten")
        opt = LearnedOptimizer([p], make_rule(family), compile=(mode == "compiled"))
        step = opt.step
    step()
    step()
    base = reset_peak_rss()
    step()
    return {"transient_mib": (peak_rss_kib() - base) / 1024}


def memory_row(family: str, mode: str, n: int) -> float | None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child-memory",
            family,
            mode,
            str(n),
            *(["--columns", str(COLUMNS)] if COLUMNS else []),
            *(f"--net={k}={v}" for k, v in NET_SETTINGS.items()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        print(f"  memory child {family}/{mode} failed: {proc.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["transient_mib"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M"])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5 at <=1M, 3 above)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--no-aten", action="store_true", help="skip the ATen-only (native kernels off) column")
    parser.add_argument("--no-reference", action="store_true", help="skip the eager reference column")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--json", default=None, help="also write the results to this JSON file (the *_cpu_s fields use its clock)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (Adam, eager and compiled only)")
    parser.add_argument("--vector", action="store_true", help="--columns 1: one vector for every family")
    parser.add_argument("--columns", type=int, default=None, help="whole-tensor rules on (n / C, C) (see COLUMNS)")
    add_net_settings_option(
        parser, "build every family's net with this setting, e.g. --net newton_schulz_steps=5 (repeatable)"
    )
    parser.add_argument("--child-memory", nargs=3, metavar=("FAMILY", "MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global COLUMNS
    COLUMNS = 1 if args.vector else args.columns
    NET_SETTINGS.update(net_settings(args.net_overrides))
    if args.child_memory:
        family, mode, n = args.child_memory
        print(json.dumps(child_memory(family, mode, int(n))))
        return

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    if not on_cpu:
        args.no_aten = args.no_reference = args.no_memory = True
    print(f"# Optimizer step time ({device})\n\n{machine_header(device)}\n\n{isa_line()}\n")
    status = f"built ({kernels.isa()})" if kernels.available() else f"off ({kernels.build_error() or 'disabled'})"
    print(f"Native kernels: {status}; ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS', '(unset)')}\n")
    print("```\n" + kernels.report() + "\n```\n")
    gemm_n = 1024 if on_cpu else 8192
    peak = matmul_gflops(gemm_n, device=device)
    print(
        f"Measured GEMM throughput ({gemm_n}^3 float32 on {device}, best of 5): {peak:.1f} GFLOP/s "
        "= the compute limit below.\n"
    )
    results = []
    for size in args.sizes:
        n = parse_size(size)
        repeats = args.repeats or (5 if n <= 1_000_000 else 3)
        for family in args.families:
            rule = make_rule(family)
            p = make_param(n, family, device)
            adam = torch.optim.Adam([p])
            eager = LearnedOptimizer([p], rule)
            candidates = {"adam": adam.step, "eager": eager.step}
            if on_cpu and kernels.available() and family in kernels.RULE_KERNELS:
                forced = LearnedOptimizer([p], rule)

                def forced_step(opt=forced):
                    with kernels.forced():
                        opt.step()

                candidates["kernels"] = forced_step
            if not args.no_aten:
                aten = LearnedOptimizer([p], rule)

                def aten_step(opt=aten):
                    with kernels.enabled_as(False):
                        opt.step()

                candidates["aten"] = aten_step
            if not args.no_compile:
                compiled = LearnedOptimizer([p], rule, compile=True)
                compiled.step()  # compile outside the timed region
                candidates["compiled"] = compiled.step
            if not args.no_reference:
                candidates["reference"] = Reference(rule, p).step
            with torch.no_grad():
                original = p.detach().clone()
            timings = measure(candidates, repeats=repeats, device=device)
            with torch.no_grad():
                p.copy_(original)
            per_coord, shapes = flops_per_coordinate(family)
            gemm_s = gemm_only_seconds(shapes, calls=-(-n // FLOP_COUNT_CHUNK), repeats=2, device=device)
            flops = per_coord * n
            row = {
                "family": family,
                "n": n,
                "repeats": repeats,
                "flops_per_coord": per_coord,
                "gemm_only_s": gemm_s,
                "limit_s": flops / (peak * 1e9),
                "state_bytes_per_param": state_bytes_per_param(eager, n),
                "adam_state_bytes_per_param": state_bytes_per_param(adam, n),
                **{f"{k}_cpu_s": v.best for k, v in timings.items()},
                **{f"{k}_wall_median_s": v.wall_median for k, v in timings.items()},
            }
            if not args.no_memory and n <= 1_000_000:
                for mode in ("adam", "eager", "aten", "reference"):
                    row[f"{mode}_transient_mib"] = memory_row(family, mode, n)
            results.append(row)
            print(
                f"  measured {family} at {size}: " + ", ".join(f"{k} {v.fmt()}" for k, v in timings.items()),
                file=sys.stderr,
                flush=True,
            )

    def ms(x):
        return "-" if x is None else f"{x * 1e3:.4g}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.3g}x"

    rows = []
    for r in results:
        g = r.get
        rows.append(
            [
                r["family"],
                f"{r['n'] / 1e6:g}M",
                ms(g("adam_cpu_s")),
                ms(g("eager_cpu_s")),
                ms(g("kernels_cpu_s")),
                ms(g("aten_cpu_s")),
                ms(g("compiled_cpu_s")),
                ms(g("reference_cpu_s")),
                ratio(g("eager_cpu_s"), g("adam_cpu_s")),
                ratio(g("aten_cpu_s"), g("kernels_cpu_s")),
                "kernels" if on_cpu and kernels.serves(r["family"]) else "ATen",
                ratio(g("reference_cpu_s"), g("eager_cpu_s")),
                ratio(g("reference_cpu_s"), g("aten_cpu_s")),
                ratio(g("reference_cpu_s"), g("compiled_cpu_s")),
            ]
        )
    print(f"\n## Step time (ms of {clock_name(device)} time, best of the repeats; ratios from the same run)\n")
    print(
        table(
            [
                "net",
                "params",
                "Adam",
                "learned eager (default)",
                "kernels forced",
                "ATen only",
                "learned compiled",
                "eager reference",
                "eager / Adam",
                "kernels vs ATen (ATen / kernels)",
                "default path (guard)",
                "speed-up eager vs ref",
                "speed-up ATen vs ref",
                "speed-up compiled vs ref",
            ],
            rows,
        )
    )
    rows = []
    for r in results:
        best = min(
            v
            for v in (r.get("eager_cpu_s"), r.get("kernels_cpu_s"), r.get("aten_cpu_s"), r.get("compiled_cpu_s"))
            if v is not None
        )
        gf = r["flops_per_coord"] * r["n"] / 1e9
        rows.append(
            [
                r["family"],
                f"{r['n'] / 1e6:g}M",
                f"{r['flops_per_coord']:.0f}",
                f"{gf / best:.1f}",
                f"{gf / best / peak:.0%}",
                ms(r["limit_s"]),
                ms(r["gemm_only_s"]),
                f"{best / r['limit_s']:.2f}x",
                f"{r['state_bytes_per_param']:.0f} (Adam {r['adam_state_bytes_per_param']:.0f})",
                " / ".join(
                    "-" if r.get(f"{m}_transient_mib") is None else f"{r[f'{m}_transient_mib']:.0f}"
                    for m in ("adam", "eager", "aten", "reference")
                ),
            ]
        )
    hardware = isa_line() if on_cpu else torch.cuda.get_device_name(device)
    print(f"\n## Efficiency (best learned path; compute limit = GEMM FLOPs / {peak:.1f} GFLOP/s on {hardware})\n")
    print(
        table(
            [
                "net",
                "params",
                "GEMM FLOP/coord",
                "achieved GFLOP/s",
                "of matmul peak",
                "compute limit ms",
                "its GEMMs alone ms",
                "step / limit",
                "state B/param",
                "peak transient MiB Adam / eager / ATen / ref",
            ],
            rows,
        )
    )
    print(
        "\nReference agreement (max |delta_ref - delta_rule| over 3 steps, 10k coords): "
        + ", ".join(f"{f} {reference_agreement(f):.1e}" for f in args.families)
    )
    print(f"\nLoad at the end: {machine_header().split('load average ')[1]}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"gemm_gflops": peak, "clock": clock_name(device), "rows": results}, indent=1)
        )


if __name__ == "__main__":
    main()
