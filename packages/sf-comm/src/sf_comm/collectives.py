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
from .topology import Topology
from .transport import Group, Handle, Recv, Send

T = TypeVar("T")


def _traced(
    ctx: CommContext,
    handle: Handle[T],
    op: str,
    group: Group,
    sends: Sequence[Send],
    recvs: Sequence[Recv],
) -> Handle[T]:
    """Report the collective to the active tracer (if any) from issue to wait.

    ``sends``/``recvs`` are what the transport moves for it (bytes are counted only while a
    tracer is active). Links are full duplex, so each link's load is the larger of what this
    rank sends and receives over it (a ring rank whose predecessor is on another machine
    waits on the inter-machine link even if it sends inside its machine). The tracer is also
    told how many ranks behind this rank's NIC cross machines in the same call
    (:func:`nic_sharers`).
    """
    tracer = trace.active()
    if tracer is None:
        return handle
    topo = ctx.topology
    out: dict[str, int] = {}
    into: dict[str, int] = {}
    counts: dict[str, list[int]] = {"intra": [0, 0], "inter": [0, 0]}  # peers out, in
    sent = [(peer, t.numel() * t.element_size()) for peer, t in sends]
    received = [(peer, shape.numel() * dtype.itemsize) for peer, shape, dtype in recvs]
    for way, (pairs, load) in enumerate(((sent, out), (received, into))):
        for peer, nbytes in pairs:
            link = "intra" if topo.same_machine(peer, ctx.rank) else "inter"
            load[link] = load.get(link, 0) + nbytes
            counts[link][way] += 1
    links = {link: max(out.get(link, 0), into.get(link, 0)) for link in {*out, *into}}
    peers = {link: max(counts[link]) for link in links}
    sharers = topo.gpus_per_nic
    if links.get("inter") and topo.gpus_per_nic > 1:
        sharers = max(
            nic_sharers(topo, group, [peer for peer, nbytes in pairs if nbytes])
            for pairs, load in ((sent, out), (received, into))
            if load.get("inter")
        )
    token = tracer.comm_start(
        op, links, max(len(sends), len(recvs)), nic_sharers=sharers, peers=peers
    )

    def finish() -> T:
        result = handle.wait()
        tracer.comm_end(token)
        return result

    return Handle(finish, handle.is_completed)


# Note [NIC sharers]
# The GPUs behind one NIC share its bandwidth, but only those that send to (or receive from)
# another machine in a call compete for it. In the symmetric strategies every rank runs the
# same call at once in its own group: a head scatter or a ring across machines has every GPU
# of the machine on the NIC, while a flat ring over all ranks crosses machines only at the
# machine's two ends (one rank sends out, another receives in). nic_sharers counts, for one
# direction, the ranks behind this rank's NIC whose peers at this rank's offsets in the group
# sit on another machine. A rank outside this rank's group is taken to run the group shifted
# by the distance between the two ranks (the mesh's groups are translates of each other);
# where that shifted group would leave its machines the rank is counted as crossing. The
# simulator divides the NIC by this count instead of by every GPU behind it.


def nic_sharers(topology: Topology, group: Group, peers: Sequence[int]) -> int:
    """Ranks behind ``group.rank``'s NIC that cross machines when each runs this call, with
    ``peers`` (this rank's peers in ``group`` in one direction); at least 1 (Note [NIC sharers]).

    Equivalent plain code, for a rank ``r`` behind the same NIC in the same group::

        crosses(r) = any(not same_machine(r, group.ranks[(index(r) + offset) % size])
                         for offset in offsets of peers)
    """
    me, size, per = group.index, group.size, topology.gpus_per_machine
    offsets = {(group.ranks.index(peer) - me) % size for peer in peers}
    nic = topology.local_of(group.rank) // topology.gpus_per_nic
    base = topology.machine_of(group.rank) * per + nic * topology.gpus_per_nic
    count = 0
    for mate in range(base, base + topology.gpus_per_nic):
        if mate in group.ranks:
            members, index = group.ranks, group.ranks.index(mate)
        else:
            shift = mate - group.rank
            if any(topology.local_of(r) + shift not in range(per) for r in group.ranks):
                count += 1  # its group is not a translate of this one: taken as crossing
                continue
            members, index = tuple(r + shift for r in group.ranks), me
        count += any(not topology.same_machine(mate, members[(index + d) % size]) for d in offsets)
    return max(1, count)


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
    return _traced(ctx, handle, "all_to_all", group, sends, recvs)


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
    return _traced(ctx, first, op, group, sends, recvs)


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

    return _traced(ctx, Handle(finish, handle.is_completed), "all_gather", group, sends, recvs)
