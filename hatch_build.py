"""The wheel's build hook: ships the native kernels bundled by ``python -m learned_optim.kernels prebuild``.

A source checkout has none (``learned_optim/kernels/prebuilt/`` is not in git), and its wheel stays pure Python: the
kernels are compiled on the machine that runs them, on first use. A release runs ``prebuild`` first; the hook then
puts the libraries and their digests in the wheel (git ignores them, so hatch would not) and tags the wheel for this
platform (``py3-none-<platform>``: the libraries are loaded with ``ctypes``, tied to no Python version or ABI).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: Where ``prebuild`` writes the libraries, relative to the project root (and inside the wheel).
PREBUILT = "learned_optim/kernels/prebuilt"


def platform_tag() -> str:
    """This interpreter's platform as a wheel tag (``linux_x86_64``, ``macosx_14_0_arm64``...)."""
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


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
            for path in (library, library.with_name(library.name + ".sha256")):
                build_data["force_include"][str(path)] = f"{PREBUILT}/{path.name}"
        build_data["pure_python"] = False
        build_data["tag"] = f"py3-none-{platform_tag()}"
