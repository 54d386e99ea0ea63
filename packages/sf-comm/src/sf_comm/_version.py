"""Version of sf-comm and the import-time check every package runs on the ones below it."""

from __future__ import annotations

import importlib
import importlib.metadata

__version__ = "0.1.0"


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _source_version(dist: str) -> str | None:
    """``__version__`` of a package importable from source (PYTHONPATH), not installed."""
    try:
        module = importlib.import_module(dist.replace("-", "_"))
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def require(dist: str, minimum: str, *, by: str) -> None:
    """Fail with a clear message unless distribution ``dist`` is at least ``minimum``.

    Args:
        dist: distribution name, e.g. ``"sf-comm"``.
        minimum: the lowest version that works, e.g. ``"0.1.0"``.
        by: the package that needs it (named in the message).

    Raises:
        ImportError: when ``dist`` is missing or older than ``minimum``.
    """
    found: str | None
    try:
        found = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        found = _source_version(dist)
    if found is None:
        raise ImportError(
            f"{by} needs {dist}>={minimum}, which is not installed; "
            f"install it with `pip install -e packages/{dist}` (tools/bootstrap.sh does this)"
        ) from None
    if _parse(found) < _parse(minimum):
        raise ImportError(
            f"{by} needs {dist}>={minimum}, but {dist} {found} is installed; "
            f"upgrade it (`pip install -e packages/{dist}`)"
        )
