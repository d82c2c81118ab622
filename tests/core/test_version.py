"""The version is written once, in pyproject.toml; ``learned_optim.__version__`` reads the installed metadata."""

import importlib.metadata
from pathlib import Path

import pytest

import learned_optim

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_version_is_the_installed_metadata_version():
    assert learned_optim.__version__ == importlib.metadata.version("learned-optim")
    assert learned_optim.__version__ != "0+unknown"  # the fallback for an uninstalled source tree


def test_installed_metadata_matches_pyproject():
    """A stale install (pyproject.toml's version changed, package not reinstalled) is caught here."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    if not PYPROJECT.is_file():
        pytest.skip("not run from a checkout")
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    assert importlib.metadata.version("learned-optim") == version
