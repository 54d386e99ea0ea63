"""The ``streamfusion::`` torch.library ops the rewritten graph calls.

Each op has a fake implementation, so Dynamo/AOT/Inductor trace around it and Inductor emits
it as an opaque call. Ops cannot take a :class:`sf_comm.Context` argument, so contexts are
registered here and ops carry an integer key (:func:`register_context`).

- ``streamfusion::gather(x, dim, length, prefix, ctx_key)``: a :class:`~sf_compile.token_layout.Shard`
  value back to the full tensor on every rank. Plain equivalent::

      full = cat([x[:prefix], *(split part of every rank, in rank order)], dim)

- ``streamfusion::attention(q, k, v, length, prefix, scale, strategy, ctx_key, backend)``:
  ``sf_attn.parallel_attention`` on [batch, seq_local, heads, head_dim] shards whose first
  ``prefix`` tokens are replicated joint text. Plain equivalent (single process, gathered)::

      out = softmax(scale * Q K^T) V      # Q, K, V: [text | all image tokens]
      return out[text | this rank's image rows]

- ``streamfusion::attention_overlap_*``: the overlapped schedule (:mod:`sf_compile.overlap`).

Concurrency contract: every rank must call the communicating ops in the same order with the
same ``length``/``prefix`` (they do: every rank compiles the same graph and the pass emits
ops in graph order).
"""

from __future__ import annotations

import torch

import sf_attn
import sf_comm

__all__ = ["context_for", "register_context"]

_CONTEXTS: dict[int, sf_comm.CommContext] = {}


def register_context(ctx: sf_comm.CommContext) -> int:
    """The key under which the ops find ``ctx`` (stable for the life of the process).

    Keys count up in registration order rather than being ``id(ctx)``: the key is a constant
    in the compiled graph, and a key that is the same in every run lets Inductor's FX graph
    cache hit across runs.
    """
    for key, known in _CONTEXTS.items():
        if known is ctx:
            return key
    key = len(_CONTEXTS)
    _CONTEXTS[key] = ctx
    return key


def context_for(key: int) -> sf_comm.CommContext:
    """The context registered under ``key``.

    Raises:
        RuntimeError: no such context (a compiled graph outlived its process's registry).
    """
    try:
        return _CONTEXTS[key]
    except KeyError:
        raise RuntimeError(
            f"sf_compile: no communication context registered under key {key}; graphs compiled "
            "with backend='streamfusion' can only run in the process that compiled them"
        ) from None


@torch.library.custom_op("streamfusion::gather", mutates_args=())
def gather(x: torch.Tensor, dim: int, length: int, prefix: int, ctx_key: int) -> torch.Tensor:
    """See the module docstring: the full tensor from every rank's shard along ``dim``."""
    ctx = context_for(ctx_key)
    split = x.narrow(dim, prefix, x.shape[dim] - prefix)
    full = sf_attn.gather(split, ctx, dim, length=length - prefix)
    if prefix:
        full = torch.cat([x.narrow(dim, 0, prefix), full], dim)
    # A custom op's output must not alias its input (world of one returns x itself), and
    # must be contiguous like the fake impl says.
    if full.data_ptr() == x.data_ptr():
        return full.clone(memory_format=torch.contiguous_format)
    return full.contiguous()


@gather.register_fake
def _(x: torch.Tensor, dim: int, length: int, prefix: int, ctx_key: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = length
    return x.new_empty(shape)  # contiguous, as torch.cat returns


def _split_joint(t: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not prefix:
        return t, None
    return t[:, prefix:], t[:, :prefix]


@torch.library.custom_op("streamfusion::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int,
    prefix: int,
    scale: float | None,
    strategy: str,
    ctx_key: int,
    backend: str,
) -> torch.Tensor:
    """See the module docstring: exact attention over the token sequence split across ranks.

    ``q, k, v``: [batch, prefix + seq_local, heads, head_dim]; returns the same shape.
    """
    ctx = context_for(ctx_key)
    img_q, text_q = _split_joint(q, prefix)
    img_k, text_k = _split_joint(k, prefix)
    img_v, text_v = _split_joint(v, prefix)
    joint = None
    if text_q is not None:
        assert text_k is not None and text_v is not None
        joint = (text_q, text_k, text_v)
    result = sf_attn.parallel_attention(
        img_q,
        img_k,
        img_v,
        ctx=ctx,
        strategy=strategy,
        joint=joint,
        scale=scale,
        seq_len=length - prefix,
        backend=backend,
    )
    if isinstance(result, tuple):
        img_out, text_out = result
        return torch.cat([text_out, img_out], dim=1)
    return result.contiguous()  # the fake impl promises a contiguous result


@attention.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int,
    prefix: int,
    scale: float | None,
    strategy: str,
    ctx_key: int,
    backend: str,
) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, whatever q's strides
