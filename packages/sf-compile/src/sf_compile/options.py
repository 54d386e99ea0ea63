"""``CompileOptions``: what ``torch.compile(..., backend="streamfusion", options={...})`` takes."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import sf_attn
import sf_comm

__all__ = ["DEBUG_ENV", "CompileOptions"]

DEBUG_ENV = "SF_COMPILE_DEBUG"
DEFAULT_DEBUG_DIR = "sf_compile_debug"


@dataclasses.dataclass(kw_only=True, slots=True)
class CompileOptions:
    """Options of the ``streamfusion`` backend (``torch.compile(options={...})`` keys).

    Attributes:
        strategy: ``sf_attn.parallel_attention`` strategy: "auto", "ulysses", "ring", "usp",
            "tas".
        ctx: the context to run on (an :class:`sf_comm.Context`, or a part of one from
            ``ctx.split``: any :class:`sf_comm.CommContext`). Default: none when torch.distributed is
            not initialised or has one rank (then the backend is the inner backend, unchanged),
            else one made by ``sf_comm.init(topology, transport)`` (cached per process).
        transport: transport for that context ("auto", "shm", "gloo", "nccl", ...); not
            together with ``ctx``.
        topology: topology for that context (e.g. "2x4"); not together with ``ctx``.
        overlap: emit the overlapped attention schedule (:mod:`sf_compile.overlap`): V's
            exchange starts before Q and K are projected. "auto" (default): on for CUDA
            contexts, off on CPU, where a put is a memcpy by the sending core and the extra
            exchange only costs (measured: ``python -m sf_compile.compile_bench overlap``).
        inner_backend: the backend the rewritten graph goes to: "inductor" (default), any
            registered name ("eager", "aot_eager"), or a backend callable.
        inner_options: options for the inner backend (Inductor config keys for "inductor").
        attention_backend: local attention kernel inside ``sf_attn`` ("auto", ...).
        on_unsupported: "gather" (Note [Gather fallback] in :mod:`sf_compile.rules`) or "error".
        debug: dump each rewritten graph (readable code plus what was sharded, replaced and
            gathered): True for ``./sf_compile_debug``, or a directory. Default: the
            ``SF_COMPILE_DEBUG`` environment variable ("1" or a directory; unset/"0" is off).
    """

    strategy: str = "auto"
    ctx: sf_comm.CommContext | None = None
    transport: str | None = None
    topology: str | None = None
    overlap: bool | str = "auto"
    inner_backend: str | Callable[..., Any] = "inductor"
    inner_options: dict[str, Any] | None = None
    attention_backend: str = "auto"
    on_unsupported: str = "gather"
    debug: bool | str | None = None

    def __post_init__(self) -> None:
        if self.strategy != "auto" and self.strategy not in sf_attn.strategy_names():
            raise ValueError(
                f"CompileOptions.strategy={self.strategy!r} is unknown; choose one of "
                f"{sf_attn.strategy_names()}"
            )
        if self.transport is not None and self.transport not in sf_comm.transport_names():
            raise ValueError(
                f"CompileOptions.transport={self.transport!r} is unknown; choose one of "
                f"{sf_comm.transport_names()}"
            )
        if self.ctx is not None and (self.transport is not None or self.topology is not None):
            raise ValueError(
                "CompileOptions: give either ctx or transport/topology (they describe the "
                f"context to create), got ctx={self.ctx!r}, transport={self.transport!r}, "
                f"topology={self.topology!r}"
            )
        if self.ctx is not None and not isinstance(self.ctx, sf_comm.CommContext):
            raise ValueError(
                "CompileOptions.ctx must be an sf_comm context (sf_comm.init or ctx.split), got "
                f"{type(self.ctx).__name__}"
            )
        if not (isinstance(self.overlap, bool) or self.overlap == "auto"):
            raise ValueError(
                f"CompileOptions.overlap must be True, False or 'auto', got {self.overlap!r}"
            )
        if self.on_unsupported not in ("gather", "error"):
            raise ValueError(
                f"CompileOptions.on_unsupported={self.on_unsupported!r}; allowed: 'gather', 'error'"
            )
        if not (isinstance(self.inner_backend, str) or callable(self.inner_backend)):
            raise ValueError(
                "CompileOptions.inner_backend must be a backend name or callable, got "
                f"{self.inner_backend!r}"
            )
        if self.debug is None:
            env = os.environ.get(DEBUG_ENV, "")
            self.debug = False if env in ("", "0") else (True if env == "1" else env)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> CompileOptions:
        """Parse ``torch.compile``'s ``options`` dict.

        Raises:
            ValueError: an unknown key (the message lists the known ones) or a bad value.
        """
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"backend='streamfusion': unknown option(s) {unknown}; known options are {known}"
            )
        return cls(**options)

    @property
    def debug_dir(self) -> str | None:
        """Where debug dumps go, or None when off."""
        if not self.debug:
            return None
        return DEFAULT_DEBUG_DIR if self.debug is True else str(self.debug)
