"""The one config-value checker (learned_optim._validation) and the three places that use it."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from learned_optim._validation import check_value
from learned_optim.meta.config import MetaTrainConfig
from learned_optim.meta.regularizers import parse_block
from learned_optim.nets.mlp import MLPConfig


@pytest.mark.parametrize(
    "annotation, value, expected",
    [
        (int, 3, 3),
        (float, 2, 2.0),
        (bool, True, True),
        (str, "a", "a"),
        (float | None, None, None),
        (Optional[int], 4, 4),  # noqa: UP045 (typing.Optional is a different object from int | None: both are tested)
        (list[int], (1, 2), [1, 2]),
        (list[float], [1, 0.5], [1.0, 0.5]),
        (tuple[float, ...], [1, 2], (1.0, 2.0)),
        (tuple[int, str], [1, "x"], (1, "x")),
        (dict[str, Any], {"a": 1}, {"a": 1}),
        (Any, object, object),
    ],
)
def test_accepts_and_canonicalizes(annotation, value, expected):
    out = check_value("cfg.x", annotation, value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    "annotation, value, message",
    [
        (int, True, r"cfg\.x must be int, got True"),
        (int, 1.5, r"cfg\.x must be int, got 1\.5"),
        (float, "1", r"cfg\.x must be float, got '1'"),
        (bool, 1, r"cfg\.x must be bool, got 1"),
        (int, None, r"cfg\.x must be int, got None"),
        (float | None, "a", r"cfg\.x must be float or null, got 'a'"),
        (list[int], 3, r"cfg\.x must be a list, got 3"),
        (list[int], [1, "2"], r"cfg\.x\[1\] must be int, got '2'"),
        (tuple[int, int], [1, 2, 3], r"cfg\.x must be a list of 2 items"),
        (dict[str, Any], [1], r"cfg\.x must be a mapping, got \[1\]"),
    ],
)
def test_rejects_with_path_expected_and_value(annotation, value, message):
    with pytest.raises(ValueError, match=message):
        check_value("cfg.x", annotation, value)


def test_all_three_configs_use_it():
    assert MLPConfig.from_dict({"decays": [0.5, 1]}).decays == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"MLPConfig\.decays\[0\] must be float, got 'a'"):
        MLPConfig.from_dict({"decays": ["a"]})
    with pytest.raises(ValueError, match=r"config\.curriculum\.stages\[0\] must be int, got 1\.5"):
        MetaTrainConfig.from_dict({"curriculum": {"stages": [1.5]}})
    with pytest.raises(ValueError, match=r"regularizers\[2\]\.probes must be int, got 'x'"):
        parse_block({"kind": "hessian_trace", "weight": 1, "probes": "x"}, where="regularizers[2]")
