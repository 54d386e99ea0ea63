"""The shard convention: the global sequence is cut into ``world_size`` contiguous chunks in
rank order, as even as possible (sizes differ by at most one, larger chunks first, like
``torch.tensor_split``)."""

from __future__ import annotations

import torch

import sf_comm


def chunk_sizes(length: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(range(length), parts)``: larger chunks first."""
    base, extra = divmod(length, parts)
    return [base + (i < extra) for i in range(parts)]


def chunk_offsets(length: int, parts: int) -> list[int]:
    """Start index of each chunk (plus the total at the end)."""
    offsets = [0]
    for size in chunk_sizes(length, parts):
        offsets.append(offsets[-1] + size)
    return offsets


def shard(x: torch.Tensor, ctx: sf_comm.CommContext, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of the full tensor ``x`` along ``dim`` (a contiguous copy).

    Equivalent to ``x.tensor_split(ctx.world_size, dim)[ctx.rank]``.
    """
    return x.tensor_split(ctx.world_size, dim)[ctx.rank].contiguous()


def gather(
    x: torch.Tensor, ctx: sf_comm.CommContext, dim: int = 1, length: int | None = None
) -> torch.Tensor:
    """The full tensor from every rank's chunk along ``dim`` (inverse of :func:`shard`).

    Args:
        x: this rank's chunk.
        ctx: the communication context.
        dim: the sharded dimension.
        length: the full length along ``dim``; None to learn it with a small all-gather.

    Returns:
        The concatenation of all ranks' chunks, identical on every rank.
    """
    group = ctx.group("world")
    if group.size == 1:
        return x
    dim = dim % x.dim()
    if length is None:
        lengths = sf_comm.all_gather(ctx, group, torch.tensor([x.shape[dim]])).wait()
        sizes = [int(t) for t in lengths]
    else:
        sizes = chunk_sizes(length, group.size)
        if sizes[ctx.rank] != x.shape[dim]:
            raise ValueError(
                f"gather: rank {ctx.rank} holds {x.shape[dim]} along dim {dim}, but the shard of a "
                f"length-{length} sequence over {group.size} ranks is {sizes[ctx.rank]}"
            )
    shapes = [x.shape[:dim] + (s,) + x.shape[dim + 1 :] for s in sizes]
    parts = sf_comm.all_gather(ctx, group, x.contiguous(), shapes).wait()
    return torch.cat(parts, dim)
