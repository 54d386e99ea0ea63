"""Joint (MMDiT) text tokens inside the blocks a strategy computes anyway.

Note [Text rows owned once]
    Text tokens are replicated: every rank holds all of them. Their keys and values join the
    first KV block a rank computes (one kernel over ``[text; block]`` instead of a kernel per
    block for them), so every query row meets the text keys exactly once. Text *queries* are
    not recomputed on every rank: the text rows are split among the members of a Ring group
    (member r owns rows ``chunk r`` of ``chunk_sizes(text, P_r)``), and each rank stacks its
    rows on top of its image queries, so they meet every KV block in the same kernels as the
    image rows. Every text row is thus computed by exactly one rank per head group, and one
    all-gather over the world assembles the text output, bit-identical on every rank (data
    movement) and exact like any other row. Per rank and layer that is one attention kernel
    per KV block the strategy visits and no kernel for text alone::

        queries = cat([text_q[my rows], q_u])                  # [B, rows + seq_u, h, D]
        step 0:  attn(queries, cat([text_k, k_own]), ...)      # text keys once
        step s:  attn(queries, kv_s), merged                   # text rows ride along
        text_out = all_gather(out[:, :rows])                   # tiles (rows r, heads i)

A mask over the text keys (``joint_mask``, [batch, text]) becomes the mask of the first
block: the text part as given, the image part open.

Note [Sharded text]
    The other layout (``text="sharded"``, the field's usual choice for MMDiT models): the text
    tokens are split across the ranks like the image tokens (``shard(text)``), so a model's
    per-token text layers run once per token instead of once per rank. Attention then sees
    no text at all: each rank's sequence is ``[its text shard, its image shard]``, a
    permutation of the full ``[text, image]`` sequence, and attention is exact under any
    permutation of the keys that keeps each query's own row. No text-specific kernel, no text
    gather; a text key mask travels with its tokens (each rank's mask over its own keys,
    gathered once, a block's mask the concatenation of its owners')::

        q_r = cat([text_q shard r, q shard r])             # seq_lens[r] = text_r + image_r
        out_r = parallel_attention(q_r, k_r, v_r)          # plain sequence, any strategy
        text_out_r, out_r = out_r[:, :text_r], out_r[:, text_r:]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import sf_comm

from .layout import Layout
from .merge import merge_attention_
from .sharding import chunk_offsets, chunk_sizes

__all__ = [
    "KV",
    "Accumulator",
    "block_key_mask",
    "concat_masks",
    "fold_text_keys",
    "gather_text",
    "join_tokens",
    "my_text_rows",
]

KV = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # keys, values: stacked [2, ...] or a pair


def my_text_rows(text_len: int, ring: sf_comm.Group) -> slice:
    """The text rows this rank computes (Note [Text rows owned once])."""
    off = chunk_offsets(text_len, ring.size)
    return slice(off[ring.index], off[ring.index + 1])


def join_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=1)`` for [batch, tokens, ...] tensors, without the copy when
    ``b`` directly follows ``a`` in memory: a model's processor projects one ``[text, image]``
    stream and cuts it into two views, which this puts back together as one view."""
    if a.shape[1] == 0:
        return b
    if b.shape[1] == 0:
        return a
    adjacent = (
        a.device == b.device
        and a.device.type != "meta"  # meta tensors share a null storage
        and a.dtype == b.dtype
        and a.dim() == b.dim()
        and a.shape[0] == b.shape[0]
        and a.shape[2:] == b.shape[2:]
        and a.stride() == b.stride()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.storage_offset() == a.storage_offset() + a.shape[1] * a.stride(1)
    )
    if adjacent:
        shape = (a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:])
        return a.as_strided(shape, a.stride(), a.storage_offset())
    return torch.cat([a, b], dim=1)


def block_key_mask(
    key_masks: Sequence[torch.Tensor] | None, owners: Sequence[int]
) -> torch.Tensor | None:
    """The key mask of a KV block made of ``owners``' tokens, in that order (Note [Sharded
    text]): their masks from ``key_masks`` (every rank's, in rank order) put together."""
    if key_masks is None:
        return None
    if len(owners) == 1:
        return key_masks[owners[0]]
    return torch.cat([key_masks[r] for r in owners], dim=1)


def fold_text_keys(
    text_kv: KV, kv: KV, joint_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(keys, values, mask)`` of the first block with the text keys in front.

    Args:
        text_kv: text keys and values, each [batch, text, heads, dim].
        kv: the block's keys and values, each [batch, seq, heads, dim] (a pair, or a stacked
            [2, ...] tensor).
        joint_mask: [batch, text] mask over the text keys (bool: True attends; or additive),
            or None.
    """
    keys = join_tokens(text_kv[0], kv[0])
    values = join_tokens(text_kv[1], kv[1])
    text_len, (batch, seq) = text_kv[0].shape[1], kv[0].shape[:2]
    return keys, values, concat_masks([(joint_mask, text_len), (None, seq)], batch)


def concat_masks(
    masks: Sequence[tuple[torch.Tensor | None, int]], batch: int
) -> torch.Tensor | None:
    """One key mask [batch, sum of lengths] for key runs put side by side, from each run's
    ``(mask or None, length)``: a run without a mask is open (True, or 0.0 for an additive
    mask, in the given masks' kind). None when no run has a mask."""
    given = [m for m, _ in masks if m is not None]
    if not given:
        return None
    if len(masks) == 1:
        return given[0]
    kind = given[0]
    pieces = []
    for m, length in masks:
        if m is None:
            fill = torch.ones if kind.dtype == torch.bool else torch.zeros
            m = fill(batch, length, dtype=kind.dtype, device=kind.device)
        pieces.append(m)
    return torch.cat(pieces, dim=1)


class Accumulator:
    """Online-softmax state of one query buffer over KV blocks (Note [Stable merge]).

    The first block is taken as it is (merging into an empty state gives exactly the block);
    later ones are merged in float32. ``result(dtype)`` is the output in ``dtype``.
    """

    def __init__(self) -> None:
        self.o: torch.Tensor | None = None  # [B, rows, h, D]; float32 once merged
        self.lse: torch.Tensor | None = None  # [B, h, rows] float32

    def add(self, o: torch.Tensor, lse: torch.Tensor) -> None:
        if self.o is None or self.lse is None:
            self.o, self.lse = o, lse
            return
        if self.o.dtype != torch.float32:
            self.o = self.o.float()
        merge_attention_(self.o, self.lse, o, lse)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        assert self.o is not None, "no block was added"
        return self.o.to(dtype)


def gather_text(
    ctx: sf_comm.CommContext,
    layout: Layout,
    tile: torch.Tensor,
    *,
    text_len: int,
    heads: int,
) -> torch.Tensor:
    """The whole text output from every rank's tile (Note [Text rows owned once]).

    ``tile`` is this rank's [batch, rows, heads_u, dim]: its Ring index's text rows in its
    Ulysses index's head group. Every rank returns the same [batch, text, heads, dim].
    """
    if ctx.world_size == 1:
        return tile
    batch, _, _, dim = tile.shape
    p_u, p_r = layout.p_u, layout.p_r
    row_sizes, row_off = chunk_sizes(text_len, p_r), chunk_offsets(text_len, p_r)
    head_sizes, head_off = chunk_sizes(heads, p_u), chunk_offsets(heads, p_u)
    place = _tile_places(layout, ctx.world_size)
    shapes = [(batch, row_sizes[r], head_sizes[i], dim) for r, i in place]
    tiles = sf_comm.all_gather(ctx, ctx.group("world"), tile, shapes).wait()
    out = tile.new_empty(batch, text_len, heads, dim)
    for (r, i), got in zip(place, tiles):
        out[:, row_off[r] : row_off[r + 1], head_off[i] : head_off[i + 1]] = got
    return out


def _tile_places(layout: Layout, world: int) -> Sequence[tuple[int, int]]:
    """(Ring index, Ulysses index) of every rank, in rank order."""
    place = [(0, 0)] * world
    for group in layout.ulysses:
        for i, rank in enumerate(group):
            place[rank] = (place[rank][0], i)
    for group in layout.ring:
        for r, rank in enumerate(group):
            place[rank] = (r, place[rank][1])
    return place
