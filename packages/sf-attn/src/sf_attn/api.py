"""``parallel_attention``: exact attention over a sequence sharded across ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import sf_comm

from .backends import agree_on_kernel
from .hybrid import gather_setting
from .joint import concat_masks, join_tokens
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


_TEXT_LAYOUTS = ("replicated", "sharded")


def _mask_kind(mask: torch.Tensor | None) -> int:
    return 0 if mask is None else 1 if mask.dtype == torch.bool else 2


def _own_shard(
    ctx: sf_comm.CommContext, local: int, length: int, held: str, whole: str
) -> list[int]:
    """The shard sizes of ``length`` tokens over the ranks, this rank's checked against the
    ``local`` it holds (messages: "holds {held}", "the shard of {whole}")."""
    sizes = chunk_sizes(length, ctx.world_size)
    if sizes[ctx.rank] != local:
        raise ValueError(
            f"rank {ctx.rank} holds {held}, but the shard of {whole} over {ctx.world_size} "
            f"ranks is {sizes[ctx.rank]} (see sf_attn.shard)"
        )
    return sizes


def _check_convention(what: str, sizes: list[int]) -> None:
    expected = chunk_sizes(sum(sizes), len(sizes))
    if sizes != expected:
        raise ValueError(
            f"{what} shards {sizes} (rank order) do not follow the shard convention: "
            f"{sum(sizes)} tokens over {len(sizes)} ranks are split {expected} (use sf_attn.shard)"
        )


def _agree_on_shapes(
    ctx: sf_comm.CommContext,
    q: torch.Tensor,
    text_local: int,
    *,
    seq_len: int | None,
    text_len: int | None,
    text: str,
    mask_kind: int,
    strategy: str,
    ulysses_degree: int | None,
) -> tuple[list[int], list[int]]:
    """Every rank's image and text token counts, ``(seq_lens, text_lens)`` in rank order,
    checked against the shard convention and the other ranks (with the strategy and degree
    asked for: ranks running different strategies would wait on each other's different
    collectives). Replicated text (or none) counts once, in ``text_lens[0]``."""
    batch, seq_local, heads, dim = q.shape
    sharded = text == "sharded" and text_local >= 0  # text_local -1: no joint text
    if seq_len is not None and (not sharded or text_len is not None):
        sizes = _own_shard(
            ctx, seq_local, seq_len, f"{seq_local} tokens", f"a {seq_len}-token sequence"
        )
        if not sharded:
            return sizes, [max(text_local, 0)]
        assert text_len is not None
        held, whole = f"{text_local} text tokens", f"{text_len} text tokens"
        return sizes, _own_shard(ctx, text_local, text_len, held, whole)
    names = strategy_names()
    mine = torch.tensor(
        [
            batch,
            seq_local,
            heads,
            dim,
            _DTYPES.index(q.dtype),
            text_local,
            int(text == "sharded"),
            mask_kind,
            names.index(strategy),
            ulysses_degree or 0,
        ]
    )
    table = torch.stack(sf_comm.all_gather(ctx, ctx.group("world"), mine).wait())  # [world, 10]
    columns = [
        "batch",
        None,
        "heads",
        "head_dim",
        "dtype",
        None if text == "sharded" else "joint text length",
        "text layout",
        "joint_mask (none, bool, additive)",
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
            elif name == "text layout":
                values = [_TEXT_LAYOUTS[x] for x in values]
            raise ValueError(f"ranks disagree on {name}: {values} (rank order)")
    sizes = table[:, 1].tolist()
    _check_convention("sequence", sizes)
    if not sharded:
        return sizes, [max(text_local, 0)]
    text_sizes = table[:, 5].tolist()
    _check_convention("text", text_sizes)
    return sizes, text_sizes


def _sharded_key_masks(
    ctx: sf_comm.CommContext,
    joint_mask: torch.Tensor,
    text_lens: Sequence[int],
    seq_lens: Sequence[int],
) -> list[torch.Tensor]:
    """Every rank's key mask over its ``[text shard, image shard]`` tokens, in rank order:
    the masks travel with their tokens (Note [Sharded text] in :mod:`sf_attn.joint`)."""
    batch = joint_mask.shape[0]
    wire = joint_mask.to(torch.uint8) if joint_mask.dtype == torch.bool else joint_mask
    shapes = [(batch, n) for n in text_lens]
    parts = sf_comm.all_gather(ctx, ctx.group("world"), wire.contiguous(), shapes).wait()
    if joint_mask.dtype == torch.bool:
        parts = [part.bool() for part in parts]
    masks = []
    for part, t, n in zip(parts, text_lens, seq_lens):
        mask = concat_masks([(part, t), (None, n)], batch)  # the image keys open
        assert mask is not None  # the text part is given
        masks.append(mask)
    return masks


def parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ctx: sf_comm.CommContext,
    strategy: str = "auto",
    joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    joint_mask: torch.Tensor | None = None,
    text: str = "replicated",
    scale: float | None = None,
    seq_len: int | None = None,
    text_len: int | None = None,
    ulysses_degree: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's sequence shard against the whole (sharded) sequence.

    Equal, up to floating-point rounding, to single-device attention on the gathered
    sequence::

        out_full = softmax(scale * Q K^T) V                     # Q, K, V: gathered shards
        out = shard(out_full)                                    # this rank's rows

    With joint (MMDiT) text tokens, the sequence is ``[text, image]`` and the text keys may
    be masked (Note [Sharded text] in :mod:`sf_attn.joint` for the two layouts)::

        out_full = softmax(scale * [TQ; Q] [TK; K]^T + mask) [TV; V]
        text_out, out = out_full[:text], shard(out_full[text:])  # replicated text
        text_out, out = shard(out_full[:text]), shard(out_full[text:])  # sharded text

    Args:
        q, k, v: this rank's shard, [batch, seq_local, heads, head_dim] (the shard convention
            of :func:`sf_attn.shard`; lengths may differ by one across ranks).
        ctx: the communication context (:func:`sf_comm.init`).
        strategy: one of "ulysses", "ring", "usp", "tas", "torus", "auto". All give the same
            numbers.
        joint: text tokens (text_q, text_k, text_v), [batch, text, heads, head_dim]: all of
            them, identical on every rank (``text="replicated"``), or this rank's shard of
            them (``text="sharded"``).
        joint_mask: mask over the text keys in ``joint`` (bool True = attend, or additive),
            [batch, text] or, sharded, this rank's [batch, text_local].
        text: "replicated" or "sharded": how ``joint`` is laid out across the ranks.
        scale: score scale; default 1/sqrt(head_dim).
        seq_len: the global (image) sequence length, if known; with ``text_len`` for sharded
            text it saves a small all-gather that checks shapes across ranks.
        text_len: the global text length (sharded text), if known.
        ulysses_degree: override the strategy's Ulysses degree (usp/tas; not with "auto").
        backend: local attention backend (see :func:`sf_attn.attention_with_lse`).

    Returns:
        out [batch, seq_local, heads, head_dim]; with ``joint``, ``(out, text_out)``: text_out
        is [batch, text, heads, head_dim], identical on every rank, for replicated text, and
        this rank's text rows [batch, text_local, heads, head_dim] for sharded text.

    Raises:
        ValueError / TypeError: bad shapes, dtypes or devices, ranks that disagree, unknown
            strategy, or heads/degrees the strategy cannot split (the message says what fits).
    """
    if strategy != "auto":
        get_strategy(strategy)  # unknown names fail before any communication
    if text not in _TEXT_LAYOUTS:
        raise ValueError(f"text must be one of {list(_TEXT_LAYOUTS)}, got {text!r}")
    _validate_local(q, k, v, joint, ctx)
    gather_setting()  # a bad SF_GATHER_KV* fails here, before any communication
    text_local = joint[0].shape[1] if joint is not None else -1
    if joint_mask is not None:
        if joint is None:
            raise ValueError("joint_mask needs joint text tokens")
        if tuple(joint_mask.shape) != (q.shape[0], text_local):
            what = "text_local" if text == "sharded" else "text"
            raise ValueError(
                f"joint_mask must be [batch={q.shape[0]}, {what}={text_local}], got "
                f"{tuple(joint_mask.shape)}"
            )
    if text_len is not None and text == "replicated" and text_len != max(text_local, 0):
        raise ValueError(
            f"text_len={text_len} but the replicated joint text holds {max(text_local, 0)} tokens"
        )
    seq_lens, text_lens = _agree_on_shapes(
        ctx,
        q,
        text_local,
        seq_len=seq_len,
        text_len=text_len,
        text=text,
        mask_kind=_mask_kind(joint_mask),
        strategy=strategy,
        ulysses_degree=ulysses_degree,
    )
    sharded = text == "sharded" and joint is not None
    if backend == "auto":  # every rank runs the same kernels (Note [Kernel choice by ...])
        agree_on_kernel(ctx, q, masked=False)
        if joint_mask is not None:
            agree_on_kernel(ctx, q, masked=True)
    how = resolve(
        ctx,
        seq_len=sum(seq_lens) + (sum(text_lens) if sharded else 0),
        heads=q.shape[2],
        head_dim=q.shape[-1],
        dtype=q.dtype,
        batch=q.shape[0],
        text_len=-1 if sharded else text_local,
        strategy=strategy,
        ulysses_degree=ulysses_degree,
    )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Note [Failure contract] (sf_comm.transport): an exception from here on, on any rank,
    # leaves messages in flight, so it breaks the context on every rank instead of letting a
    # later call consume them.
    with ctx.transport.call("parallel_attention"):
        if sharded:  # Note [Sharded text]: text is ordinary sequence, in front of the image
            assert joint is not None
            key_masks = None
            if joint_mask is not None:
                key_masks = _sharded_key_masks(ctx, joint_mask, text_lens, seq_lens)
            out, _ = how.strategy.execute(
                *(join_tokens(t, x).contiguous() for t, x in zip(joint, (q, k, v))),
                ctx=ctx,
                layout=how.layout,
                seq_lens=[t + s for t, s in zip(text_lens, seq_lens)],
                scale=scale,
                key_masks=key_masks,
                backend=backend,
            )
            return out[:, text_local:], out[:, :text_local]
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
