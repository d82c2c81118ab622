"""The orthogonalisation's matrix products in float32 against bfloat16, by matrix size, on this machine.

::

    python benchmarks/newton_schulz_dtype.py                 # 5 Newton-Schulz steps, the sizes below
    python benchmarks/newton_schulz_dtype.py --steps 3 --sizes 128x128 1000x1000
    python benchmarks/newton_schulz_dtype.py --routes --steps 3 --sizes 10x96 64x128 4x32x128 64x512

With ``--routes``: in float32, the direct iteration against the iteration on the Gram matrix (each on the same
normalised wide matrices, a size ``BxRxC`` being B matrices at once), and the route
:func:`~learned_optim.features.takes_gram_route` takes there (at least twice as wide as high and
``GRAM_MIN_SAVED_MULTIPLY_ADDS`` saved: below that the Gram route's extra ops cost more than its products save).

Times ``learned_optim.features.newton_schulz_orthogonalize(x, steps, dtype=...)`` on one matrix of each size in
float32 and in bfloat16 (one torch thread, CPU time, best of ``--repeats`` rounds of calls, round-robin), and prints
their ratio beside what ``newton_schulz_dtype: "auto"`` takes there on this machine
(:meth:`~learned_optim.nets.adafac_mlp.AdafacMLP.newton_schulz_products_dtype`: bfloat16 where the CPU has native
bfloat16 products, :func:`~learned_optim._numerics.bfloat16_matmul_is_native`, and the smaller side reaches
``AdafacMLP.bfloat16_min_side``). The relative error of each against float64 comes with it. Where ``auto`` takes
bfloat16 on a matrix that bfloat16 slows down (or the reverse), the threshold does not fit this CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_flags_line, machine_header, measure, table  # noqa: E402

from learned_optim import build_rule  # noqa: E402
from learned_optim._numerics import bfloat16_matmul_is_native  # noqa: E402
from learned_optim.features import (  # noqa: E402
    _newton_schulz_direct,
    _newton_schulz_on_gram,
    newton_schulz_orthogonalize,
    takes_gram_route,
)

SIZES = ["32x32", "64x256", "128x128", "128x512", "160x640", "192x192", "256x256", "256x1536", "512x512", "1000x1000"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=SIZES, metavar="ROWSxCOLS")
    parser.add_argument("--steps", type=int, default=5, help="Newton-Schulz steps (the flagship runs 3)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--routes", action="store_true", help="float32: the direct iteration against the Gram route")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.routes:
        _routes(args.sizes, args.steps, args.repeats)
        return
    rule = build_rule("adafac_mlp", {"newton_schulz_steps": args.steps, "newton_schulz_dtype": "auto"})
    print(f"# Newton-Schulz products, float32 against bfloat16\n\n{machine_header()}\n\n{cpu_flags_line()}\n")
    print(
        f"{args.steps} steps on one matrix, one torch thread, CPU time, best of {args.repeats} rounds; native "
        f"bfloat16 products: {bfloat16_matmul_is_native('cpu')}; auto takes bfloat16 from a smaller side of "
        f"{rule.bfloat16_min_side} on such a CPU\n"
    )
    rows = []
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        r, c = (int(v) for v in size.lower().split("x"))
        x = torch.randn(r, c, generator=generator)
        calls = max(1, int(2e8 / (r * c * min(r, c))))  # ~0.1 s of float32 products per round

        def timed(dtype: torch.dtype, x: torch.Tensor = x, calls: int = calls):
            def run() -> None:
                for _ in range(calls):
                    newton_schulz_orthogonalize(x, args.steps, dtype=dtype)

            return run

        timing = measure({"float32": timed(torch.float32), "bfloat16": timed(torch.bfloat16)}, repeats=args.repeats)
        exact = newton_schulz_orthogonalize(x.double(), args.steps)
        errors = {}
        for dtype in (torch.float32, torch.bfloat16):
            result = newton_schulz_orthogonalize(x, args.steps, dtype=dtype).double()
            errors[dtype] = float((result - exact).norm() / exact.norm())
        f32, b16 = timing["float32"].best / calls * 1e3, timing["bfloat16"].best / calls * 1e3
        auto = rule.newton_schulz_products_dtype(torch.device("cpu"), r, c)
        rows.append(
            [
                f"{r} x {c}",
                f"{f32:.3f}",
                f"{b16:.3f}",
                f"{f32 / b16:.2f}",
                str(auto).removeprefix("torch."),
                f"{errors[torch.float32]:.1e}",
                f"{errors[torch.bfloat16]:.1e}",
            ]
        )
    header = ["matrix", "float32 ms", "bfloat16 ms", "float32 / bfloat16", "auto takes", "err f32", "err bf16"]
    print(table(header, rows))


def _routes(sizes: list[str], steps: int, repeats: int) -> None:
    """The ``--routes`` table: each size's direct and Gram-route iterations in float32, and the route taken."""
    print(f"# Newton-Schulz in float32: the direct iteration against the Gram route\n\n{machine_header()}\n")
    print(f"{cpu_flags_line()}\n\n{steps} steps, one torch thread, CPU time, best of {repeats} rounds\n")
    rows = []
    generator = torch.Generator().manual_seed(0)
    for size in sizes:
        *lead, r, c = (int(v) for v in size.lower().split("x"))
        y = torch.randn(*(lead or [1]), min(r, c), max(r, c), generator=generator)
        y = y / torch.linalg.matrix_norm(y, keepdim=True)
        calls = max(1, int(2e7 / y.numel() / min(r, c)))

        def timed(route, y: torch.Tensor = y, calls: int = calls):
            def run() -> None:
                for _ in range(calls):
                    route(y, steps)

            return run

        timing = measure({"direct": timed(_newton_schulz_direct), "gram": timed(_newton_schulz_on_gram)}, repeats)
        direct, gram = (timing[k].best / calls * 1e3 for k in ("direct", "gram"))
        taken = "gram" if takes_gram_route(y, steps) else "direct"
        rows.append([size, f"{direct:.4f}", f"{gram:.4f}", f"{gram / direct:.2f}", taken])
    print(table(["matrices", "direct ms", "Gram route ms", "Gram / direct", "taken"], rows))


if __name__ == "__main__":
    main()
