"""One checker of config values against dataclass field annotations, shared by every config of the package.

Used by :meth:`learned_optim.nets.NetConfig.from_dict`, the meta-training config sections
(:mod:`learned_optim.meta.config`) and the regularizer blocks (:mod:`learned_optim.meta.regularizers`), so
that a malformed ``config.json`` / YAML value fails when it is loaded, with one message format::

    <path> must be <expected>, got <value>
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from typing import Any, Union, cast, get_args, get_origin

__all__ = ["check_value", "positive_finite"]

#: Accepted Python types per scalar annotation (``bool`` is never accepted as a number).
_SCALARS: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def check_value(path: str, annotation: Any, value: Any) -> Any:
    """``value`` if it fits ``annotation``, in the annotation's canonical form; else ``ValueError``.

    Supported annotations, alone or in a union (``X | None``, ``Optional[X]``):

    * ``bool``, ``int``, ``float``, ``str`` (a ``float`` field accepts an ``int`` and returns it as ``float``;
      ``True``/``False`` are not numbers);
    * ``list[X]`` and ``tuple[X, ...]`` from a JSON list or a tuple (returned as ``list`` / ``tuple``; each item
      checked against ``X`` under ``path[i]``); ``tuple[X, Y]`` checks the length and each position;
    * ``dict[...]`` / ``Mapping[...]`` from any mapping (returned as given);
    * ``None`` only where the annotation allows it.

    Any other annotation (``Any``, a class) passes the value through unchecked. ``path`` names the field in
    the message, e.g. ``"config.unroll.segment_length"`` or ``"DMLSTMConfig.hidden_size"``.
    """
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    expected = []
    for option in options:
        if option is type(None):
            expected.append("null")
            continue
        kind, args = get_origin(option) or option, get_args(option)
        if kind in _SCALARS:
            if isinstance(value, _SCALARS[kind]) and (kind is bool or not isinstance(value, bool)):
                return float(cast(float, value)) if kind is float else value
            expected.append(kind.__name__)
        elif kind in (list, tuple):
            fixed = kind is tuple and args and not (len(args) == 2 and args[1] is Ellipsis)
            if isinstance(value, (list, tuple)) and (not fixed or len(value) == len(args)):
                items = args if fixed else [args[0] if args else Any] * len(value)
                return kind(
                    check_value(f"{path}[{i}]", item, v) for i, (item, v) in enumerate(zip(items, value, strict=True))
                )
            expected.append(f"a list of {len(args)} items" if fixed else "a list")
        elif isinstance(kind, type) and issubclass(kind, Mapping):
            if isinstance(value, Mapping):
                return value
            expected.append("a mapping")
        else:
            return value
    raise ValueError(f"{path} must be {' or '.join(expected)}, got {value!r}")


def positive_finite(x: float) -> bool:
    """Whether ``x`` is a positive finite number (a YAML ``.inf`` passes a bare ``x > 0``)."""
    return math.isfinite(x) and x > 0
