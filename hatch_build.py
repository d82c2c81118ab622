"""The wheel's build hook: ships the native kernels bundled by ``python -m learned_optim.kernels prebuild``.

A source checkout has none (``learned_optim/kernels/prebuilt/`` is not in git), and its wheel stays pure Python: the
kernels are compiled on the machine that runs them, on first use. A release runs ``prebuild`` first; the hook then
puts the libraries and their digests in the wheel (git ignores them, so hatch would not) and tags the wheel for this
platform (``py3-none-<platform>``: the libraries are loaded with ``ctypes``, tied to no Python version or ABI).
"""

from __future__ import annotations

import platform
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: Where ``prebuild`` writes the libraries, relative to the project root (and inside the wheel): the package's
#: ``learned_optim.kernels._build.prebuilt_dir()``, whose names (``prebuilt_name``) and digests (``<library>.sha256``)
#: this hook only copies. (A build hook runs without the package's dependencies, so it cannot import them.)
PREBUILT = "learned_optim/kernels/prebuilt"


def platform_tag() -> str:
    """The wheel's platform tag: this interpreter's platform (``linux_x86_64``; PyPI wants a manylinux tag, which
    ``auditwheel repair`` checks and sets), on macOS with this machine's architecture and macOS version, as the
    libraries are built for (the interpreter's may be ``universal2`` or an older version)."""
    tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    if tag.startswith("macosx"):
        major = platform.mac_ver()[0].split(".")[0] or "11"
        return f"macosx_{major}_0_{platform.machine()}"
    return tag


class PrebuiltKernelsHook(BuildHookInterface):
    """Adds ``learned_optim/kernels/prebuilt/*.so`` (and their ``.sha256``) to a standard wheel, if there are any."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":  # an editable install reads the checkout itself
            return
        folder = Path(self.root) / PREBUILT
        libraries = sorted(folder.glob("learned_optim-*.so"))
        if not libraries:
            return
        for library in libraries:
            digest = library.with_name(library.name + ".sha256")
            if not digest.exists():  # the runtime would refuse the library: do not ship it
                raise FileNotFoundError(f"{library} has no digest {digest.name}: build it with `python -m "
                                        "learned_optim.kernels prebuild`, which writes both")  # fmt: skip
            for path in (library, digest):
                build_data["force_include"][str(path)] = f"{PREBUILT}/{path.name}"
        build_data["pure_python"] = False
        build_data["tag"] = f"py3-none-{platform_tag()}"
