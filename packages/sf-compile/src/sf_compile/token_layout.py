"""Where a value's tokens live: on every rank (``None``) or split by the shard convention.

A value in the rewritten graph is either *replicated* (``None``: every rank holds the whole
tensor, as in eager) or a :class:`Shard`: one dimension carries the token sequence, its first
``prefix`` tokens are replicated (joint text tokens of MMDiT models) and the remaining
``length - prefix`` tokens are cut into ``world`` contiguous chunks in rank order, exactly as
:func:`sf_attn.shard` cuts them (sizes differ by at most one, larger chunks first)::

    full:  [ text (prefix) | image chunk 0 | image chunk 1 | ... | image chunk W-1 ]
    rank r holds  [ text (prefix) | image chunk r ]      along ``dim``
"""

from __future__ import annotations

import dataclasses

from sf_attn.sharding import chunk_offsets, chunk_sizes

__all__ = ["Shard", "Split", "TokenLayout"]


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """A tensor whose dim ``dim`` carries ``length`` tokens, ``prefix`` of them replicated.

    Attributes:
        dim: the token dimension of the (full) tensor, non-negative.
        length: full number of tokens along ``dim`` (replicated prefix included).
        prefix: leading tokens held whole by every rank (joint text); the rest are split.
    """

    dim: int
    length: int
    prefix: int = 0

    def __post_init__(self) -> None:
        if self.dim < 0:
            raise ValueError(f"Shard.dim must be >= 0, got {self.dim}")
        if not 0 <= self.prefix <= self.length:
            raise ValueError(
                f"Shard.prefix must be in [0, length={self.length}], got {self.prefix}"
            )

    def moved(self, dim: int) -> Shard:
        """The same tokens along another dimension."""
        return dataclasses.replace(self, dim=dim)

    def __str__(self) -> str:
        text = f", text prefix {self.prefix}" if self.prefix else ""
        return f"tokens on dim {self.dim} ({self.length}{text})"


TokenLayout = Shard | None  # None: replicated, the whole tensor on every rank


@dataclasses.dataclass(frozen=True, slots=True)
class Split:
    """This rank's place in the sequence split: rank ``rank`` of ``world``."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(
                f"Split needs 0 <= rank < world, got rank={self.rank}, world={self.world}"
            )

    def local_len(self, shard: Shard) -> int:
        """Tokens this rank holds along ``shard.dim`` (replicated prefix included)."""
        return shard.prefix + chunk_sizes(shard.length - shard.prefix, self.world)[self.rank]

    def offset(self, shard: Shard) -> int:
        """Index in the full tensor of this rank's first split (non-prefix) token."""
        return shard.prefix + chunk_offsets(shard.length - shard.prefix, self.world)[self.rank]
