"""``parallel_attention``: exact attention over a sequence sharded across ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import sf_comm

from .backends import agree_on_kernel
from .resolution import resolve
from .sharding import chunk_sizes
from .strategies import get_strategy, strategy_names

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_4d(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{name} must be 4-D [batch, seq, heads, head_dim], got {t.dim()}-D shape {tuple(t.shape)}"
        )
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; allowed: {[str(d) for d in _DTYPES]}")
    return t


def _validate_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    joint: Sequence[torch.Tensor] | None,
    ctx: sf_comm.CommContext,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, t)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v must have the same shape [batch, seq_local, heads, head_dim]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != ctx.device.type or k.device != q.device or v.device != q.device:
        raise ValueError(
            f"q, k, v must live on the context's device type {ctx.device.type}; got "
            f"{q.device}, {k.device}, {v.device}"
        )
    if joint is None:
        return
    if not isinstance(joint, (tuple, list)) or len(joint) != 3:
        raise ValueError("joint must be a tuple (text_q, text_k, text_v)")
    for name, t in zip(("text_q", "text_k", "text_v"), joint):
        _check_4d(f"joint {name}", t)
        if t.shape[0] != q.shape[0] or t.shape[2:] != q.shape[2:] or t.dtype != q.dtype:
            raise ValueError(
                f"joint {name} must be [batch={q.shape[0]}, text, heads={q.shape[2]}, "
                f"head_dim={q.shape[3]}] in {q.dtype}; got {tuple(t.shape)} in {t.dtype}"
            )
        if t.shape != joint[0].shape:
            raise ValueError(
                f"joint tensors must share a shape; got {[tuple(x.shape) for x in joint]}"
            )


def _agree_on_shapes(
    ctx: sf_comm.CommContext,
    q: torch.Tensor,
    text_len: int,
    seq_len: int | None,
    strategy: str,
    ulysses_degree: int | None,
) -> list[int]:
    """Every rank's seq_local, checked against the shard convention and the other ranks
    (with the strategy and degree asked for: ranks running different strategies would wait
    on each other's different collectives)."""
    world = ctx.world_size
    batch, seq_local, heads, dim = q.shape
    if seq_len is not None:
        sizes = chunk_sizes(seq_len, world)
        if sizes[ctx.rank] != seq_local:
            raise ValueError(
                f"rank {ctx.rank} holds {seq_local} tokens, but the shard of a {seq_len}-token "
                f"sequence over {world} ranks is {sizes[ctx.rank]} (see sf_attn.shard)"
            )
        return sizes
    names = strategy_names()
    mine = torch.tensor(
        [
            batch,
            seq_local,
            heads,
            dim,
            _DTYPES.index(q.dtype),
            text_len,
            names.index(strategy),
            ulysses_degree or 0,
        ]
    )
    table = torch.stack(sf_comm.all_gather(ctx, ctx.group("world"), mine).wait())  # [world, 8]
    columns = [
        "batch",
        None,
        "heads",
        "head_dim",
        "dtype",
        "joint text length",
        "strategy",
        "ulysses_degree",
    ]
    for col, name in enumerate(columns):
        if name is not None and not bool((table[:, col] == table[0, col]).all()):
            values = table[:, col].tolist()
            if name == "dtype":
                values = [str(_DTYPES[x]) for x in values]
            elif name == "strategy":
                values = [names[x] for x in values]
            elif name == "ulysses_degree":
                values = [x or None for x in values]
            raise ValueError(f"ranks disagree on {name}: {values} (rank order)")
    sizes = table[:, 1].tolist()
    expected = chunk_sizes(sum(sizes), world)
    if sizes != expected:
        raise ValueError(
            f"sequence shards {sizes} (rank order) do not follow the shard convention: a "
            f"{sum(sizes)}-token sequence over {world} ranks is split {expected} (use sf_attn.shard)"
        )
    return sizes


def parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ctx: sf_comm.CommContext,
    strategy: str = "auto",
    joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    joint_mask: torch.Tensor | None = None,
    scale: float | None = None,
    seq_len: int | None = None,
    ulysses_degree: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's sequence shard against the whole (sharded) sequence.

    Equal, up to floating-point rounding, to single-device attention on the gathered
    sequence::

        out_full = softmax(scale * Q K^T) V                     # Q, K, V: gathered shards
        out = shard(out_full)                                    # this rank's rows

    Args:
        q, k, v: this rank's shard, [batch, seq_local, heads, head_dim] (the shard convention
            of :func:`sf_attn.shard`; lengths may differ by one across ranks).
        ctx: the communication context (:func:`sf_comm.init`).
        strategy: one of "ulysses", "ring", "usp", "tas", "torus", "auto". All give the same
            numbers.
        joint: replicated text tokens (text_q, text_k, text_v), [batch, text, heads, head_dim],
            identical on every rank (MMDiT joint attention).
        joint_mask: [batch, text] mask over text keys (bool True = attend, or additive).
        scale: score scale; default 1/sqrt(head_dim).
        seq_len: the global sequence length, if known; saves a small all-gather that checks
            shapes across ranks.
        ulysses_degree: override the strategy's Ulysses degree (usp/tas; not with "auto").
        backend: local attention backend (see :func:`sf_attn.attention_with_lse`).

    Returns:
        out [batch, seq_local, heads, head_dim]; with ``joint``, ``(out, text_out)`` where
        text_out [batch, text, heads, head_dim] is identical on every rank.

    Raises:
        ValueError / TypeError: bad shapes, dtypes or devices, ranks that disagree, unknown
            strategy, or heads/degrees the strategy cannot split (the message says what fits).
    """
    if strategy != "auto":
        get_strategy(strategy)  # unknown names fail before any communication
    _validate_local(q, k, v, joint, ctx)
    text_len = joint[0].shape[1] if joint is not None else -1
    if joint_mask is not None:
        if joint is None:
            raise ValueError("joint_mask needs joint text tokens")
        if tuple(joint_mask.shape) != (q.shape[0], text_len):
            raise ValueError(
                f"joint_mask must be [batch={q.shape[0]}, text={text_len}], got {tuple(joint_mask.shape)}"
            )
    seq_lens = _agree_on_shapes(ctx, q, text_len, seq_len, strategy, ulysses_degree)
    if backend == "auto":  # every rank runs the same kernels (Note [Kernel choice by ...])
        agree_on_kernel(ctx, q, masked=False)
        if joint_mask is not None:
            agree_on_kernel(ctx, q, masked=True)
    how = resolve(
        ctx,
        seq_len=sum(seq_lens),
        heads=q.shape[2],
        head_dim=q.shape[-1],
        dtype=q.dtype,
        batch=q.shape[0],
        text_len=text_len,
        strategy=strategy,
        ulysses_degree=ulysses_degree,
    )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Note [Failure contract] (sf_comm.transport): an exception from here on, on any rank,
    # leaves messages in flight, so it breaks the context on every rank instead of letting a
    # later call consume them.
    with ctx.transport.call("parallel_attention"):
        out, text_out = how.strategy.execute(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            ctx=ctx,
            layout=how.layout,
            seq_lens=seq_lens,
            scale=scale,
            joint=None if joint is None else tuple(t.contiguous() for t in joint),  # type: ignore[arg-type]
            joint_mask=joint_mask,
            backend=backend,
        )
    if joint is None:
        return out
    assert text_out is not None
    return out, text_out
