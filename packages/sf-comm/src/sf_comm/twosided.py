"""``gloo`` / ``nccl``: the two-sided baseline through torch.distributed.

Every message is a paired isend/irecv (``batch_isend_irecv``); all-to-all uses the
library's own ``all_to_all_single``. Tensors travel as raw bytes, so every dtype moves
bit-exactly whatever the library supports arithmetically.

Note [Checked two-sided messages] (gloo)
    gloo aborts the whole process (a C++ size check) when a receive is posted with another
    size than the matching send, and a peer in another collective just leaves both sides
    waiting. So on gloo every message is announced by a small header (bytes, op code, call
    tag: Note [Call tags] in :mod:`sf_comm.transport`) on its own tag, and the receive for
    the data is posted only once the header matched. Each message of a pair gets its own
    tags (from a per-pair counter), so data never meets a receive meant for another message
    whatever order the handles are waited in. Waits poll (with back-off) so that a wait can
    also watch for dead ranks on this host, for a peer that gave up (a key in the job's
    store, Note [Failure contract]) and for its own timeout; a rank that times out asks the
    awaited peers what they are doing, through the store, and names it. gloo's send/recv
    works report completion only to a blocking ``wait()`` (and a ``wait`` that times out
    closes the connection), so waiter threads block in them and the polling side reads
    their flags. The header costs one more small message
    per message, which the CPU baseline can afford. The data receive is posted by the
    waiter thread that saw the header arrive (Note [Receives posted on arrival]), not only
    when the receiving rank next polls: a rank busy computing would otherwise hold the
    sender's bytes back until its next wait, and no transfer would overlap compute.

nccl keeps the plain path: its waits only order CUDA streams, and host-side polling would
cost the GPU pipeline its overlap.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._liveness import dead_ranks, rank_processes
from ._setup import destroy_groups
from .transport import (
    WATCH_INTERVAL,
    CommError,
    CommTimeout,
    Group,
    Handle,
    Recv,
    Send,
    Transport,
    as_bytes,
    op_code,
    ranks_text,
)

_TAG_SPACE = 1 << 29  # per-pair message counter wraps here (tags stay small ints)
_ANSWER_S = 1.0  # how long a timed-out rank waits for its peers to say what they do


class TwoSidedTransport(Transport):
    """Paired send/recv through a torch.distributed backend (``gloo`` or ``nccl``)."""

    one_sided = False

    def __init__(self, *, rank: int, world_size: int, timeout: float, backend: str) -> None:
        super().__init__(rank=rank, world_size=world_size, timeout=timeout)
        self.name = backend
        self._timeout = datetime.timedelta(seconds=timeout)
        # (host, pid) of every rank, so a failure can say which peer on this host died,
        # and a job token naming this transport's keys in the store.
        token = [secrets.token_hex(6) if rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        self._where = rank_processes()
        self._store: Any = None
        try:
            self._store = dist.distributed_c10d._get_default_store()
        except Exception:  # no store: peers learn of failures from the library only
            self._store = None
        self._key = f"sf/{token[0]}"
        self._answered = False  # told a timed-out peer what this rank waits in
        self._checked = backend == "gloo"  # Note [Checked two-sided messages]
        # gloo messages go over a process group of their own: an exchange abandoned by a
        # failure leaves its operations pending there, and they go when close() destroys it
        # instead of poisoning the job's default group.
        self._pg = dist.new_group(backend="gloo", timeout=self._timeout) if self._checked else None
        self._waiter = _waiter() if self._checked else None
        self._seq_out = [0] * world_size  # messages sent to each peer
        self._seq_in = [0] * world_size  # messages received from each peer
        self._pending: list[_Exchange] = []
        self._posting = threading.RLock()  # _pending and its posting: caller and waiter threads

    # -- failure handling (Note [Failure contract]) --------------------------------------

    def _notify_peers(self, reason: str) -> None:  # the first failure wins
        if self._store is not None:
            self._store.compare_set(f"{self._key}/abort", "", reason)

    def _peer_gave_up(self, what: str, peers: Sequence[int]) -> str | None:
        """A peer's reason for giving up, if one did; answers a peer's question first."""
        if self._store is None:
            return None
        if not self._answered and self._store.check([f"{self._key}/ask"]):
            self._answered = True
            self._store.set(f"{self._key}/status/{self.rank}", f"{what} for ranks {list(peers)}")
        if not self._store.check([f"{self._key}/abort"]):
            return None
        return bytes(self._store.get(f"{self._key}/abort")).decode()

    def _ask(self, what: str, peers: Sequence[int]) -> str:
        """What the awaited ``peers`` say they are doing, and which ranks of the job do not
        answer: every waiting rank answers the question within a poll interval, so a rank
        that does not is busy outside communication (Note [Checked two-sided messages])."""
        if self._store is None:
            return ""
        self._answered = True  # a rank that asks is waiting too: it answers for itself
        self._store.set(f"{self._key}/status/{self.rank}", f"{what} for ranks {list(peers)}")
        self._store.set(f"{self._key}/ask", str(self.rank))
        others = [r for r in range(self.world_size) if r != self.rank]
        deadline = time.monotonic() + _ANSWER_S
        answers: dict[int, str] = {}
        while len(answers) < len(others) and time.monotonic() < deadline:
            for r in others:
                key = f"{self._key}/status/{r}"
                if r not in answers and self._store.check([key]):
                    answers[r] = bytes(self._store.get(key)).decode()
            time.sleep(WATCH_INTERVAL / 5)
        parts = [f"rank {p} waits in {answers[p]}" for p in peers if p in answers]
        silent = [r for r in others if r not in answers]
        if silent:
            parts.append(
                f"not in any communication (busy outside communication: hung or slow): "
                f"{ranks_text(silent)}"
            )
        return "; ".join(parts)

    def _dead(self, patience: float = 0.0) -> str | None:
        """Which ranks on this host died (any rank, not only the awaited ones: a rank waiting
        on a live peer that waits on the dead one must still name the dead one)."""
        dead = dead_ranks(self._where, range(self.world_size), patience=patience)
        return ", ".join(f"rank {p} (pid {self._where[p][1]}) died" for p in dead) or None

    def _watch(self, peers: Sequence[int], what: str, start: float) -> None:
        cause = self._peer_gave_up(what, peers)
        if cause is not None:
            raise self._fail(f"{what}: a peer gave up ({cause})", cause=cause)
        dead = self._dead()
        if dead is not None:
            raise self._fail(f"{what}: {dead}")
        if time.monotonic() - start > self.timeout:
            raise self._timed_out(what, peers, f"timed out after {self.timeout:.0f}s")

    def _why(self) -> str:
        """`` (rank 3 (pid 123) died)`` when the library refused an operation because a peer
        on this host died (it says only that a connection closed), else ""."""
        dead = self._dead(patience=2.0)
        return f" ({dead})" if dead else ""

    def _timed_out(self, what: str, peers: Sequence[int], detail: str) -> CommError:
        answers = self._ask(what, peers)
        message = f"{what} {detail} waiting for ranks {list(peers)}"
        return self._fail(f"{message}: {answers}" if answers else message, CommTimeout)

    def _wait(self, works: Sequence[Any], what: str, peers: Sequence[int]) -> None:
        """Wait for ``works``; on failure raise a :class:`CommError` naming the rank that
        caused it and what each side was doing."""
        if self._checked:
            self._spin(lambda: all(w.is_completed() for w in works), peers, what)
        try:
            for work in works:
                work.wait(self._timeout)
        except Exception as exc:  # gloo raises RuntimeError/DistBackendError variants
            cause = self._peer_gave_up(what, peers)  # answers a question first
            if cause is not None:
                raise self._fail(f"{what}: a peer gave up ({cause})", cause=cause) from exc
            # a connection resets while the killed peer is still being torn down: wait a little
            dead = self._dead(patience=2.0)
            if dead is not None:
                raise self._fail(f"{what}: {dead}") from exc
            raise self._timed_out(what, peers, f"failed in {self.name} ({exc})") from exc

    # -- exchanges -----------------------------------------------------------------------

    def _tags(self, counters: list[int], peer: int) -> tuple[int, int]:
        """(header tag, data tag) of the next message on the pair (Note [Checked ...])."""
        counters[peer] = (counters[peer] + 1) % _TAG_SPACE
        return 2 * counters[peer] + 1, 2 * counters[peer]

    def exchange(
        self, group: Group, sends: Sequence[Send], recvs: Sequence[Recv], *, op: str
    ) -> Handle[list[torch.Tensor]]:
        self._check()
        self.check_peers(sends, recvs, op)
        self.record(op, sends)
        device = sends[0][1].device if sends else None
        outputs = [torch.empty(shape, dtype=dtype, device=device) for _, shape, dtype in recvs]
        peers = sorted({p for p, _ in sends} | {p for p, _, _ in recvs})
        what = self.activity(op)
        if not self._checked:
            p2p = [dist.P2POp(dist.isend, as_bytes(t), peer) for peer, t in sends]
            p2p += [
                dist.P2POp(dist.irecv, as_bytes(out), peer)
                for (peer, _, _), out in zip(recvs, outputs)
            ]
            works = self._start(p2p, what)

            def finish_plain() -> list[torch.Tensor]:
                self._wait(works, what, peers)
                return outputs

            return Handle(finish_plain, lambda: all(w.is_completed() for w in works))
        pending = _Exchange(self, what, peers, op_code(op), sends, recvs, outputs)
        with self._posting:
            self._pending.append(pending)
        pending.post_on_arrival()

        def finish() -> list[torch.Tensor]:
            self._spin(pending.advance, peers, what)
            self._wait(pending.works, what, peers)
            return outputs

        return Handle(
            finish, lambda: pending.advance() and all(w.is_completed() for w in pending.works)
        )

    def _start(self, p2p: list[dist.P2POp], what: str) -> list[Any]:
        """Post ``p2p``: one batch on nccl; on gloo one tagged message each, tracked by the
        waiter thread (Note [Checked two-sided messages])."""
        if not p2p:
            return []
        try:
            if self._waiter is None:
                return dist.batch_isend_irecv(p2p)
            return [
                self._waiter.track(op.op(op.tensor, op.peer, group=self._pg, tag=op.tag))  # type: ignore[misc]
                for op in p2p
            ]
        except Exception as exc:
            raise self._fail(f"{self.name} {what} failed to start{self._why()}: {exc}") from exc

    def _library_group(self, group: Group) -> dist.ProcessGroup | None:
        """The process group a collective of ``group`` runs on: never the job's default group
        on gloo (see the note in ``__init__``)."""
        if self._pg is not None and (group.pg is None or group.pg == dist.group.WORLD):
            return self._pg
        return group.pg

    def _post_ready(self) -> None:
        """Post the data receives of pending exchanges whose headers matched, in issue order
        (a receive is never posted ahead of an earlier exchange's)."""
        with self._posting:
            while self._pending and self._pending[0].headers_checked():
                self._pending.pop(0).post_data()

    def _post_on_arrival(self) -> None:
        """:meth:`_post_ready` from a waiter thread when a header arrived (Note [Receives
        posted on arrival]). A failure is left for the caller's next poll, which meets it
        again and raises it where it can be handled."""
        if self.closed or self.broken is not None:
            return
        with contextlib.suppress(BaseException):  # raised again by the caller's own poll
            self._post_ready()

    def all_to_all(
        self, group: Group, inputs: Sequence[torch.Tensor], out_shapes: Sequence[torch.Size]
    ) -> Handle[list[torch.Tensor]]:
        self._check()
        me = group.index
        dtype, device = inputs[me].dtype, inputs[me].device
        self.record("all_to_all", [(r, inputs[i]) for i, r in enumerate(group.ranks) if i != me])
        item = inputs[me].element_size()
        what = self.activity("all_to_all")
        # The library orders a group by global rank; a Group's member order may differ
        # (layouts number members by their Ulysses index), so permute into library order.
        pg = self._library_group(group)
        pg_ranks = dist.get_process_group_ranks(pg) if pg is not None else list(group.ranks)
        if sorted(pg_ranks) != sorted(group.ranks):
            raise CommError(
                f"rank {self.rank}: group {group.name} {group.ranks} does not match its process group {pg_ranks}"
            )
        order = [group.ranks.index(r) for r in pg_ranks]  # library position -> member index
        send_splits = [inputs[i].numel() * item for i in order]
        recv_splits = [int(torch.Size(out_shapes[i]).numel()) * item for i in order]
        peers = [r for r in group.ranks if r != self.rank]
        if self._checked:
            self._check_all_to_all(pg, group, pg_ranks, send_splits, recv_splits, what)
        send = torch.cat([as_bytes(inputs[i]) for i in order])
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
        try:
            work = dist.all_to_all_single(
                recv, send, recv_splits, send_splits, group=pg, async_op=True
            )
        except Exception as exc:
            raise self._fail(f"{self.name} {what} failed to start{self._why()}: {exc}") from exc
        if self._waiter is not None:
            work = self._waiter.track(work)

        def finish() -> list[torch.Tensor]:
            self._wait([work], what, peers)
            out: list[torch.Tensor] = [torch.empty(0)] * len(order)
            for chunk, i in zip(recv.split(recv_splits), order):
                out[i] = chunk.view(dtype).view(out_shapes[i])
            return out

        return Handle(finish, work.is_completed)  # type: ignore[union-attr]

    def _check_all_to_all(
        self,
        pg: dist.ProcessGroup | None,
        group: Group,
        pg_ranks: Sequence[int],
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
        what: str,
    ) -> None:
        """Headers of an all-to-all: every member's (bytes, op code, call tag) for every other
        member, checked before the data moves (Note [Checked two-sided messages])."""
        code = op_code("all_to_all")
        mine = torch.tensor(
            [
                [n, code, self.send_tag(r) if r != self.rank else 0]
                for r, n in zip(pg_ranks, send_splits)
            ],
            dtype=torch.int64,
        )
        theirs = torch.empty_like(mine)
        peers = [r for r in group.ranks if r != self.rank]
        work = dist.all_to_all_single(theirs, mine, group=pg, async_op=True)
        self._wait([work], what, peers)
        for r, n, got in zip(pg_ranks, recv_splits, theirs.tolist()):
            if r == self.rank:
                continue
            problem = self.header_mismatch(what, r, (n, code, self.recv_tag(r)), tuple(got))  # type: ignore[arg-type]
            if problem:
                raise self._fail(problem)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        if self._pg is not None:
            destroy_groups([self._pg], pending=self._broken is not None)
            self._pg = None

    def barrier(self, group: Group) -> None:
        self._check()
        try:
            pg = self._library_group(group)
            dist.monitored_barrier(pg, timeout=self._timeout) if self.name == "gloo" else (
                dist.barrier(group=pg)
            )
        except Exception as exc:
            raise self._fail(f"{self.name} barrier failed: {exc}") from exc


class _Exchange:
    """A checked gloo exchange in flight (Note [Checked two-sided messages]): headers and
    data sends posted at once, data receives once the headers matched."""

    def __init__(
        self,
        transport: TwoSidedTransport,
        what: str,
        peers: Sequence[int],
        code: int,
        sends: Sequence[Send],
        recvs: Sequence[Recv],
        outputs: list[torch.Tensor],
    ) -> None:
        t = self.t = transport
        self.what, self.peers = what, peers
        p2p = []
        for peer, tensor in sends:
            data = as_bytes(tensor)
            h_tag, d_tag = t._tags(t._seq_out, peer)
            header = torch.tensor([data.numel(), code, t.send_tag(peer)], dtype=torch.int64)
            p2p.append(dist.P2POp(dist.isend, header, peer, tag=h_tag))
            p2p.append(dist.P2POp(dist.isend, data, peer, tag=d_tag))
        # [3] int64 each: bytes, op code, call tag announced by the peer
        self.headers = [torch.empty(3, dtype=torch.int64) for _ in recvs]
        self.expect: list[tuple[int, tuple[int, int, int], int, torch.Tensor]] = []
        for (peer, _, _), out, header in zip(recvs, outputs, self.headers):
            h_tag, d_tag = t._tags(t._seq_in, peer)
            data = as_bytes(out)
            self.expect.append((peer, (data.numel(), code, t.recv_tag(peer)), d_tag, data))
            p2p.append(dist.P2POp(dist.irecv, header, peer, tag=h_tag))
        self.works = t._start(p2p, what)
        self.header_works = self.works[len(sends) * 2 :]
        self.posted = not recvs

    def headers_checked(self) -> bool:
        """True once every header arrived and matched (raises on a mismatch)."""
        if not all(w.is_completed() for w in self.header_works):
            return False
        self.t._wait(self.header_works, self.what, self.peers)  # raises a failed receive
        for (peer, want, _, _), header in zip(self.expect, self.headers):
            problem = self.t.header_mismatch(self.what, peer, want, tuple(header.tolist()))  # type: ignore[arg-type]
            if problem:
                raise self.t._fail(problem)
        return True

    def post_data(self) -> None:
        recvs = [dist.P2POp(dist.irecv, data, peer, tag=tag) for peer, _, tag, data in self.expect]
        self.works = self.works + self.t._start(recvs, self.what)
        self.posted = True

    def post_on_arrival(self) -> None:
        """Have the waiter threads post the data receives when the headers arrive (Note
        [Receives posted on arrival]); at once if they already have."""
        for work in self.header_works:
            work.on_done = self.t._post_on_arrival
        if all(w.is_completed() for w in self.header_works):
            self.t._post_on_arrival()

    def advance(self) -> bool:
        """Post what can be posted; True once this exchange's data receives are posted."""
        if not self.posted:
            self.t._post_ready()
        return self.posted


class _Tracked:
    """A gloo work whose completion the :class:`_Waiter` reports (same methods as a Work)."""

    __slots__ = ("done", "error", "on_done", "work")

    def __init__(self, work: dist.Work) -> None:
        self.work = work
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.on_done: Callable[[], None] | None = None  # run by the waiter thread once done

    def is_completed(self) -> bool:
        return self.done.is_set()

    def wait(self, timeout: datetime.timedelta | None = None) -> None:
        self.done.wait(None if timeout is None else timeout.total_seconds())
        if self.error is not None:
            raise self.error


class _Waiter:
    """Daemon threads that block in gloo works' ``wait()`` and flag each one done (Note
    [Checked two-sided messages]). Every tracked work gets a thread of its own at once (an
    idle one, or a new one), so no observation waits behind another: a data send completes
    only after the peer saw the header, which a queue would have put behind that send.
    One per process (:func:`_waiter`), so contexts that come and go reuse the threads."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Tracked | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def track(self, work: dist.Work) -> _Tracked:
        tracked = _Tracked(work)
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                threading.Thread(target=self._run, name="sf-gloo-wait", daemon=True).start()
        self._queue.put(tracked)
        return tracked

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                item.work.wait()
            except BaseException as exc:  # reported to whoever waits on the item
                item.error = exc
            finally:
                item.done.set()
            callback = item.on_done
            if callback is not None and item.error is None:
                callback()
            # An idle thread must not keep a finished work alive: the work holds its process
            # group, whose sockets would stay open until this thread's next item.
            item = None
            with self._lock:
                self._idle += 1


# Note [Receives posted on arrival]
# A checked exchange posts its data receives only after the headers matched (Note [Checked
# two-sided messages]). Posted from the polls alone, that happens when the receiving rank
# next waits: during an attention block nothing polls, the sender's data waits for the
# receive, and a transfer issued before the block moves only after it (measured on a 2x2
# emulation: a 4 MB shift took as long after 220 ms of compute as on its own). So the waiter
# thread that sees a header arrive posts the ready receives itself, under the transport's
# posting lock (the caller's polls take it too), in issue order as before. A header that
# does not match is left for the caller's next poll, which raises it on the caller's thread.


_WAITER: list[_Waiter] = []


def _waiter() -> _Waiter:
    if not _WAITER:
        _WAITER.append(_Waiter())
    return _WAITER[0]
