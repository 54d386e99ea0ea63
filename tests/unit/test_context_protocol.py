"""Tier 1: ``sf_comm.CommContext`` and the classes that implement it, without processes."""

from __future__ import annotations

import inspect

import pytest

import sf_comm
from sf_comm.split import SubContext

_METHODS = sorted(
    name
    for name, value in vars(sf_comm.CommContext).items()
    if callable(value) and (not name.startswith("_") or name in ("__enter__", "__exit__"))
)
_PROPERTIES = sorted(
    name for name, value in vars(sf_comm.CommContext).items() if isinstance(value, property)
)


def _parameters(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_protocol_lists_what_strategies_use() -> None:
    """Catches the interface growing or losing a member unnoticed (every implementation,
    the simulator's included, must follow such a change)."""
    assert _PROPERTIES == ["device", "rank", "topology", "transport", "world_size"]
    assert _METHODS == [
        "__enter__",
        "__exit__",
        "barrier",
        "call",
        "close",
        "group",
        "subgroup",
    ]


@pytest.mark.parametrize("cls", [sf_comm.Context, SubContext])
@pytest.mark.parametrize("name", _METHODS)
def test_methods_match_the_protocol(cls: type, name: str) -> None:
    """Catches an implementation whose method is missing or takes other parameters (another
    name, no default), which a runtime ``isinstance`` check would not see."""
    assert _parameters(getattr(cls, name)) == _parameters(getattr(sf_comm.CommContext, name))
