"""``gloo`` / ``nccl``: the two-sided baseline through torch.distributed.

Every message is a paired isend/irecv (``batch_isend_irecv``); all-to-all uses the
library's own ``all_to_all_single``. Tensors travel as raw bytes, so every dtype moves
bit-exactly whatever the library supports arithmetically.

Timeouts and dead peers are the library's: the process group is created with the job's
timeout, and a peer that dies closes its sockets, which makes pending operations raise.
Errors are re-raised as :class:`CommError` naming this rank, the operation and the peers.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ._liveness import dead_ranks, rank_processes
from .transport import CommError, Group, Handle, Recv, Send, Transport


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


class TwoSidedTransport(Transport):
    """Paired send/recv through a torch.distributed backend (``gloo`` or ``nccl``)."""

    one_sided = False

    def __init__(self, *, rank: int, world_size: int, timeout: float, backend: str) -> None:
        super().__init__(rank=rank, world_size=world_size, timeout=timeout)
        self.name = backend
        self._timeout = datetime.timedelta(seconds=timeout)
        # (host, pid) of every rank, so a failure can say which peer on this host died.
        self._where = rank_processes()

    def _wait(self, works: Sequence[dist.Work], op: str, peers: Sequence[int]) -> None:
        try:
            for work in works:
                work.wait(self._timeout)
        except Exception as exc:  # gloo raises RuntimeError/DistBackendError variants
            # a connection resets while the killed peer is still being torn down: wait a little
            dead = dead_ranks(self._where, peers, patience=2.0)
            cause = "".join(f"rank {p} (pid {self._where[p][1]}) died; " for p in dead)
            raise CommError(
                f"rank {self.rank}: {cause}{self.name} {op} with ranks {sorted(set(peers))} "
                f"failed: {exc}"
            ) from exc

    def exchange(
        self, group: Group, sends: Sequence[Send], recvs: Sequence[Recv], *, op: str
    ) -> Handle[list[torch.Tensor]]:
        self.record(op, sends)
        device = sends[0][1].device if sends else None
        outputs = [torch.empty(shape, dtype=dtype, device=device) for _, shape, dtype in recvs]
        p2p = [dist.P2POp(dist.isend, _as_bytes(t), peer) for peer, t in sends]
        p2p += [
            dist.P2POp(dist.irecv, out.view(-1).view(torch.uint8), peer)
            for (peer, _, _), out in zip(recvs, outputs)
        ]
        for peer in [p for p, _ in sends] + [p for p, _, _ in recvs]:
            if peer == self.rank:
                raise ValueError(f"{op}: rank {self.rank} cannot send to itself")
        peers = [p for p, _ in sends] + [p for p, _, _ in recvs]
        try:
            works = dist.batch_isend_irecv(p2p) if p2p else []
        except Exception as exc:
            raise CommError(f"rank {self.rank}: {self.name} {op} failed to start: {exc}") from exc

        def finish() -> list[torch.Tensor]:
            self._wait(works, op, peers)
            return outputs

        return Handle(finish, lambda: all(w.is_completed() for w in works))

    def all_to_all(
        self, group: Group, inputs: Sequence[torch.Tensor], out_shapes: Sequence[torch.Size]
    ) -> Handle[list[torch.Tensor]]:
        me = group.index
        dtype, device = inputs[me].dtype, inputs[me].device
        self.record("all_to_all", [(r, inputs[i]) for i, r in enumerate(group.ranks) if i != me])
        item = inputs[me].element_size()
        # The library orders a group by global rank; a Group's member order may differ
        # (layouts number members by their Ulysses index), so permute into library order.
        pg_ranks = (
            dist.get_process_group_ranks(group.pg) if group.pg is not None else list(group.ranks)
        )
        if sorted(pg_ranks) != sorted(group.ranks):
            raise CommError(
                f"rank {self.rank}: group {group.name} {group.ranks} does not match its process group {pg_ranks}"
            )
        order = [group.ranks.index(r) for r in pg_ranks]  # library position -> member index
        send = torch.cat([_as_bytes(inputs[i]) for i in order])
        send_splits = [inputs[i].numel() * item for i in order]
        recv_splits = [int(torch.Size(out_shapes[i]).numel()) * item for i in order]
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
        try:
            work = dist.all_to_all_single(
                recv, send, recv_splits, send_splits, group=group.pg, async_op=True
            )
        except Exception as exc:
            raise CommError(f"rank {self.rank}: {self.name} all_to_all failed: {exc}") from exc

        def finish() -> list[torch.Tensor]:
            self._wait([work], "all_to_all", group.ranks)
            out: list[torch.Tensor] = [torch.empty(0)] * len(order)
            for chunk, i in zip(recv.split(recv_splits), order):
                out[i] = chunk.view(dtype).view(out_shapes[i])
            return out

        return Handle(finish, work.is_completed)

    def barrier(self, group: Group) -> None:
        try:
            dist.monitored_barrier(group.pg, timeout=self._timeout) if self.name == "gloo" else (
                dist.barrier(group=group.pg)
            )
        except Exception as exc:
            raise CommError(f"rank {self.rank}: {self.name} barrier failed: {exc}") from exc
