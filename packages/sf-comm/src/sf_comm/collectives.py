"""Collectives built from the transport's exchange primitive.

Each returns a :class:`~sf_comm.transport.Handle`; ``handle.wait()`` gives the result and
``with handle:`` waits on exit. Every member of the group must call the same collective in
the same order (see the ordering contract in :mod:`sf_comm.transport`).

Shapes of what a rank receives are passed in (``out_shapes``) rather than exchanged: the
sequence-parallel strategies always know them from the shard convention, and it saves a
round trip. When omitted, every member is assumed to send tensors of the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

from . import trace
from ._context_protocol import CommContext
from .transport import Group, Handle, Recv, Send

T = TypeVar("T")


def _traced(
    ctx: CommContext,
    handle: Handle[T],
    op: str,
    sends: Sequence[Send],
    recvs: Sequence[Recv],
) -> Handle[T]:
    """Report the collective to the active tracer (if any) from issue to wait.

    ``sends``/``recvs`` are what the transport moves for it (bytes are counted only while a
    tracer is active). Links are full duplex, so each link's load is the larger of what this
    rank sends and receives over it (a ring rank whose predecessor is on another machine
    waits on the inter-machine link even if it sends inside its machine).
    """
    tracer = trace.active()
    if tracer is None:
        return handle
    topo = ctx.topology
    out: dict[str, int] = {}
    into: dict[str, int] = {}
    sent = [(peer, t.numel() * t.element_size()) for peer, t in sends]
    received = [(peer, shape.numel() * dtype.itemsize) for peer, shape, dtype in recvs]
    for pairs, load in ((sent, out), (received, into)):
        for peer, nbytes in pairs:
            link = "intra" if topo.same_machine(peer, ctx.rank) else "inter"
            load[link] = load.get(link, 0) + nbytes
    links = {link: max(out.get(link, 0), into.get(link, 0)) for link in {*out, *into}}
    token = tracer.comm_start(op, links, max(len(sends), len(recvs)))

    def finish() -> T:
        result = handle.wait()
        tracer.comm_end(token)
        return result

    return Handle(finish, handle.is_completed)


def _check_same(tensors: Sequence[torch.Tensor], op: str) -> None:
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) > 1 or len(devices) > 1:
        raise TypeError(f"{op}: inputs must share one dtype and device, got {dtypes} on {devices}")


def all_to_all(
    ctx: CommContext,
    group: Group,
    inputs: Sequence[torch.Tensor],
    out_shapes: Sequence[Sequence[int]] | None = None,
) -> Handle[list[torch.Tensor]]:
    """``inputs[i]`` goes to member i; result ``[j]`` is what member j sent here.

    Splits may be uneven: ``out_shapes[j]`` is the shape member j sends to this rank.
    Equivalent plain code (with a gather of everything everywhere)::

        result[j] = inputs_of_member[j][group.index]
    """
    if len(inputs) != group.size:
        raise ValueError(
            f"all_to_all over {group.name} needs one input per member ({group.size}), "
            f"got {len(inputs)}"
        )
    _check_same(inputs, "all_to_all")
    shapes = [torch.Size(s) for s in out_shapes] if out_shapes is not None else None
    if shapes is None:
        if len({t.shape for t in inputs}) > 1:
            raise ValueError("all_to_all with inputs of different shapes needs out_shapes")
        shapes = [inputs[0].shape] * group.size
    if len(shapes) != group.size:
        raise ValueError(f"all_to_all: out_shapes needs {group.size} entries, got {len(shapes)}")
    if group.size == 1:
        return Handle.completed([inputs[0].clone()])
    handle = ctx.transport.all_to_all(group, list(inputs), shapes)
    me, dtype = group.index, inputs[0].dtype
    sends = [(r, inputs[i]) for i, r in enumerate(group.ranks) if i != me]
    recvs = [(r, shapes[i], dtype) for i, r in enumerate(group.ranks) if i != me]
    return _traced(ctx, handle, "all_to_all", sends, recvs)


def shift(
    ctx: CommContext,
    group: Group,
    tensor: torch.Tensor,
    offset: int = 1,
    out_shape: Sequence[int] | None = None,
) -> Handle[torch.Tensor]:
    """Send ``tensor`` to member ``index + offset`` and receive from member ``index - offset``.

    ``offset=1`` is the ring shift; offset s is stage s of the pairwise staged exchange that
    Torus Attention uses. Equivalent plain code::

        result = tensor_of_member[(group.index - offset) % group.size]
    """
    shape = torch.Size(out_shape) if out_shape is not None else tensor.shape
    if offset % group.size == 0:
        if shape != tensor.shape:
            raise ValueError(f"shift by {offset} in a group of {group.size} keeps the shape")
        return Handle.completed(tensor.clone())
    dst, src = group.peer(offset), group.peer(-offset)
    op = f"shift{offset:+d}"
    sends, recvs = [(dst, tensor)], [(src, shape, tensor.dtype)]
    handle = ctx.transport.exchange(group, sends, recvs, op=op)
    first: Handle[torch.Tensor] = Handle(lambda: handle.wait()[0], handle.is_completed)
    return _traced(ctx, first, op, sends, recvs)


def ring_shift(
    ctx: CommContext, group: Group, tensor: torch.Tensor, out_shape: Sequence[int] | None = None
) -> Handle[torch.Tensor]:
    """Ring step: send to the next member, receive from the previous one."""
    return shift(ctx, group, tensor, 1, out_shape)


def all_gather(
    ctx: CommContext,
    group: Group,
    tensor: torch.Tensor,
    out_shapes: Sequence[Sequence[int]] | None = None,
) -> Handle[list[torch.Tensor]]:
    """Every member's tensor, in member order (``out_shapes[j]``: member j's shape)."""
    shapes = [torch.Size(s) for s in out_shapes] if out_shapes else [tensor.shape] * group.size
    if len(shapes) != group.size:
        raise ValueError(f"all_gather: out_shapes needs {group.size} entries, got {len(shapes)}")
    if shapes[group.index] != tensor.shape:
        raise ValueError(
            f"all_gather: out_shapes[{group.index}]={tuple(shapes[group.index])} must be this "
            f"rank's own shape {tuple(tensor.shape)}"
        )
    me = group.index
    if group.size == 1:
        return Handle.completed([tensor.clone()])
    sends = [(r, tensor) for i, r in enumerate(group.ranks) if i != me]
    recvs = [(r, shapes[i], tensor.dtype) for i, r in enumerate(group.ranks) if i != me]
    handle = ctx.transport.exchange(group, sends, recvs, op="all_gather")
    local = tensor.clone()

    def finish() -> list[torch.Tensor]:
        got = handle.wait()
        return [*got[:me], local, *got[me:]]

    return _traced(ctx, Handle(finish, handle.is_completed), "all_gather", sends, recvs)
