"""Shared pytest fixtures of the learned_optim test suite.

Fixtures only (no tests here). Everything runs offline and on CPU; the Hub is never contacted:
:func:`hf_offline` patches ``huggingface_hub.constants.HF_HUB_OFFLINE``, which ``huggingface_hub``
reads through ``constants.is_offline_mode()`` on every request (the ``HF_HUB_OFFLINE`` environment
variable itself is only read when ``huggingface_hub`` is imported, so setting it in a test is too late).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import learned_optim
from learned_optim import UpdateRule

#: Every registered net family, sorted so test ids are stable.
FAMILY_NAMES = sorted(learned_optim.FAMILIES)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> Iterator[None]:
    """Run the suite with one intra-op thread (override with ``LEARNED_OPTIM_TEST_THREADS``).

    The tests use tiny tensors, for which thread start-up costs more than it saves; on a busy
    machine, two spinning OpenMP threads per test process made small-op tests ~20x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LEARNED_OPTIM_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread during the test, and the previous count restored after it (for tests of the CLIs,
    which call ``torch.set_num_threads`` themselves)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=FAMILY_NAMES)
def family(request: pytest.FixtureRequest) -> str:
    """Each registered net family in turn (a test using it runs once per family)."""
    return request.param


@pytest.fixture
def make_rule() -> Callable[..., UpdateRule]:
    """Factory ``make_rule(family, seed=0, **config_overrides)`` of a freshly initialised net.

    The weights are random (seeded), i.e. an *untrained* net: good for testing the runtime contract,
    not for expecting descent.
    """

    def make(family: str, seed: int = 0, **overrides: Any) -> UpdateRule:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return learned_optim.FAMILIES[family](**overrides)

    return make


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put ``huggingface_hub`` in offline mode for the test: any HTTP request raises."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert huggingface_hub.constants.is_offline_mode()


@pytest.fixture
def checkpoint_dir(tmp_path: Path, make_rule: Callable[..., UpdateRule]) -> Path:
    """A checkpoint folder of an untrained RNNProp net with optimizer defaults ``lr=0.5, weight_decay=0.01``."""
    directory = tmp_path / "checkpoint"
    learned_optim.save_pretrained(
        make_rule("rnnprop", seed=1),
        directory,
        name="test-rnnprop",
        description="untrained RNNProp for tests",
        optimizer_defaults={"lr": 0.5, "weight_decay": 0.01},
        training={"tasks": ["none (untrained test net)"], "results": {"note": "untrained"}},
    )
    return directory


#: Name of the entry :func:`temp_zoo` puts in the zoo (no "_", so timm can register it).
TEMP_ZOO_NAME = "testzoo-mlp"


@pytest.fixture
def temp_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_rule: Callable[..., UpdateRule]) -> tuple[Path, str]:
    """A temporary zoo with one untrained MLP entry, installed by patching ``learned_optim.hub.zoo_dir``.

    Returns ``(zoo_root, entry_name)``.
    """
    root = tmp_path / "zoo"
    learned_optim.save_pretrained(
        make_rule("mlp", seed=2),
        root / TEMP_ZOO_NAME,
        name=TEMP_ZOO_NAME,
        description="untrained MLP optimizer (test zoo entry)",
        optimizer_defaults={"lr": 1.0},
        training={"tasks": ["quadratic (test)"], "results": {"final_loss": 0.5}},
    )
    monkeypatch.setattr(learned_optim.hub, "zoo_dir", lambda: root)
    return root, TEMP_ZOO_NAME
