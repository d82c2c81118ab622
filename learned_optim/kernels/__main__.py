"""The native kernels' command line.

::

    python -m learned_optim.kernels report            # which path each net family takes here, and why
    python -m learned_optim.kernels prebuild          # the libraries a wheel bundles, into kernels/prebuilt/
    python -m learned_optim.kernels prebuild --out DIR --isa avx2 portable

``prebuild`` compiles, with this machine's C++ compiler, one library per instruction set of its architecture (every
one of :data:`~learned_optim.kernels.ISAS` on x86-64, whatever this CPU runs) from the sources as they are, the C++
runtime linked in and threads of their own, into the package's ``kernels/prebuilt/`` (``--out``: elsewhere). A wheel
built afterwards ships them (``hatch_build.py`` tags it for this platform), and a machine without a compiler then
loads the one for its CPU instead of falling back to ATen; the guard measures it there like any build.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ._build import ISAS, prebuild, prebuilt_dir
from ._runtime import report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m learned_optim.kernels", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("report", help="which path each net family's step takes on this machine, and why")
    build = commands.add_parser(
        "prebuild", help="compile the libraries a wheel bundles for machines without a compiler"
    )
    build.add_argument("--out", type=Path, default=None, help="folder (default: the package's kernels/prebuilt/)")
    build.add_argument(
        "--isa", nargs="+", choices=sorted(ISAS), default=None, help="default: every one of this architecture"
    )
    args = parser.parse_args(argv)
    if args.command == "report":
        print(report())
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or prebuilt_dir()
    try:
        built = prebuild(out, args.isa)
    except (RuntimeError, ValueError) as err:
        raise SystemExit(f"prebuild: {err}") from err
    for library in built:
        print(library)


if __name__ == "__main__":
    main()
