"""Swapping a model's attention processors for sequence-parallel ones (shared by the plans).

Every model's processor stands in for one diffusers processor class and computes what it
computes, with the attention call over the rank-split sequence. The part they share lives in
:class:`SequenceParallelProcessor`; a model's subclass holds only its own projections, RoPE
and output layout (see :mod:`sf_models.flux` and the other model modules).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import torch

import sf_attn

from .plan import ShardState

__all__ = [
    "SequenceParallelProcessor",
    "project_out",
    "project_qkv",
    "restore_attention_processors",
    "split_tokens",
    "swap_attention_processors",
]

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SequenceParallelProcessor(abc.ABC):
    """Base of the plans' attention processors: delegate, refuse, run the split attention.

    Called like the processor it replaced (``inner``), it::

        if not state.active:                         # Note [Inactive processors]
            return inner(attn, hidden_states, ...)   # the original, unchanged
        self.check(encoder_hidden_states, attention_mask)  # ValueError for what the plan cannot run
        return self.forward(attn, hidden_states, ...)      # the model's subclass

    and a subclass's :meth:`forward` is ``inner``'s computation with the attention call replaced
    by :meth:`self_attention` (this rank's tokens over the whole split sequence) or
    :meth:`joint_attention` (plus text tokens, replicated or sharded).

    Subclasses set :attr:`model_name`, :attr:`replaces` and :attr:`seq_len_key` (and
    :attr:`text_len_key` where the text is not ``encoder_hidden_states``), implement
    :meth:`forward`, and override :meth:`check` where they refuse other arguments than a
    mask, or take one.

    Args:
        state: the shared per-call state (context, strategy, input lengths).
        inner: the processor this one replaces; used while no parallel forward runs
            (Note [Inactive processors] in :mod:`sf_models.plan`).
    """

    model_name: ClassVar[str]  # for messages, e.g. "Flux"
    replaces: ClassVar[type]  # the diffusers processor class this one stands in for
    seq_len_key: ClassVar[str]  # ShardState.lengths key of the split sequence's full length
    # ShardState.lengths key of the text's full length (the forward input that carries it)
    text_len_key: ClassVar[str] = "encoder_hidden_states"

    def __init__(self, state: ShardState, inner: Any) -> None:
        self.state = state
        self.inner = inner

    # diffusers' attention modules filter keyword arguments by this signature, so it is the
    # replaced processors' (Flux, CogVideoX, HunyuanVideo; Wan passes the same positionally).
    # A processor replacing one with another signature overrides __call__ with that one.
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Any:
        if not self.state.active:
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        self.check(encoder_hidden_states, attention_mask)
        return self.forward(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
        )

    def check(
        self, encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> None:
        """Refuse what the model's plan cannot run; by default any attention mask.

        Raises:
            ValueError: naming the model and the argument.
        """
        if attention_mask is not None:
            raise ValueError(
                f"parallelize({self.model_name}): attention_mask is not supported under "
                "sequence parallelism"
            )

    @abc.abstractmethod
    def forward(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any,
        attention_mask: Any,
        rotary: Any,
    ) -> Any:
        """``inner``'s computation on this rank's tokens, during a parallel forward."""

    @property
    def seq_len(self) -> int:
        """Full (unsplit) length of the split sequence in the current call."""
        return self.state.lengths[self.seq_len_key]

    def self_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """This rank's rows [B, seq_local, H * D] (in ``query``'s dtype) of the attention over
        the whole split sequence, from its q, k, v [B, seq_local, H, D].

        Equivalent plain code: ``sdpa(q, k, v)`` on the gathered sequence, flattened, then
        this rank's chunk of rows.
        """
        state = self.state
        out = sf_attn.parallel_attention(
            query,
            key,
            value,
            ctx=state.ctx,
            strategy=state.strategy,
            seq_len=self.seq_len,
            ulysses_degree=state.ulysses_degree,
        )
        assert isinstance(out, torch.Tensor)  # no joint: one tensor back
        return out.flatten(2, 3).to(query.dtype)

    @property
    def text_len(self) -> int:
        """Full (unsplit) text length in the current call (0 without text)."""
        return self.state.lengths.get(self.text_len_key, 0)

    def joint_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        text: QKV,
        text_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`self_attention` joined by the text tokens ``text`` = (q, k, v), each
        [B, T_local, H, D]: (this rank's rows, the text rows [B, T_local, H * D]), in
        ``query``'s dtype. ``T_local`` is all ``T`` text tokens with replicated text, this
        rank's chunk of them with sharded text (``state.text``, Note [Text layouts] in
        :mod:`sf_models.plan`); ``text_mask`` [B, T_local] covers the same tokens.

        Equivalent plain code: ``sdpa(cat([text, q]), cat([text, k]), cat([text, v]),
        attn_mask=text keys masked by text_mask)`` on the gathered text and sequence, then
        this rank's rows of each (all text rows with replicated text).
        """
        state = self.state
        sharded = state.text == "sharded"
        out, text_out = sf_attn.parallel_attention(
            query,
            key,
            value,
            ctx=state.ctx,
            strategy=state.strategy,
            joint=text,
            joint_mask=text_mask,
            text=state.text,
            seq_len=self.seq_len,
            # Sharded: saves the text shape check. Replicated: the joint tensors' own length.
            text_len=self.text_len if sharded else None,
            ulysses_degree=state.ulysses_degree,
        )
        return out.flatten(2, 3).to(query.dtype), text_out.flatten(2, 3).to(query.dtype)


def project_qkv(attn: Any, x: torch.Tensor, *, added: bool = False) -> QKV:
    """Query, key, value [B, seq, H, D] of ``x`` [B, seq, C]: diffusers ``Attention``'s
    ``to_q/k/v`` projections, then its ``norm_q``/``norm_k`` where set.

    Args:
        attn: the diffusers ``Attention`` module.
        x: the tokens to project.
        added: project with the text stream's weights instead (``add_q/k/v_proj``,
            ``norm_added_q``/``norm_added_k``), as joint-attention blocks do.
    """
    if added:
        projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
    else:
        projections = (attn.to_q, attn.to_k, attn.to_v)
        norm_q, norm_k = attn.norm_q, attn.norm_k
    query, key, value = (proj(x).unflatten(-1, (attn.heads, -1)) for proj in projections)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def split_tokens(qkv: QKV, n: int) -> tuple[QKV, QKV]:
    """(q, k, v) [B, seq, H, D] cut along the sequence into their first ``n`` tokens and the
    rest (views), e.g. a projected ``cat([text, image])`` stream into text and image."""
    head = (qkv[0][:, :n], qkv[1][:, :n], qkv[2][:, :n])
    tail = (qkv[0][:, n:], qkv[1][:, n:], qkv[2][:, n:])
    return head, tail


def project_out(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """diffusers ``Attention``'s output projection ``to_out`` (linear, then dropout)."""
    return attn.to_out[1](attn.to_out[0](x))  # type: ignore[no-any-return]


def swap_attention_processors(
    module: torch.nn.Module,
    state: ShardState,
    *,
    processor: type[SequenceParallelProcessor],
    select: Callable[[str], bool] = lambda name: True,
) -> None:
    """Replace every selected ``processor.replaces`` processor by ``processor(state, old)``.

    With ``processor`` and ``select`` bound (``functools.partial``), this is a plan's
    ``attach``.

    Args:
        module: the diffusers transformer (an AttentionMixin).
        state: the per-call state the new processors read.
        processor: the sequence-parallel processor class, built around the one it replaces.
        select: which processors (by their ``attn_processors`` name) to replace; the others
            stay (e.g. Wan's cross-attention, HunyuanVideo's token refiner).

    Raises:
        ValueError: the strategy (with ``state.ulysses_degree``) cannot split the model's heads
            on the context's topology, or "auto" is given a degree (sf_attn's message), the
            model is already parallelized, or a selected block uses another processor
            (IP-Adapter, fused QKV, custom).
    """
    model: Any = module
    model_name, replaces = processor.model_name, processor.replaces
    if state.strategy != "auto" or state.ulysses_degree is not None:
        # Fail here, not mid-forward. A named strategy's layout depends on the heads and the
        # topology only, so any sequence length and dtype give the layout the layers will run.
        state.resolve(
            heads=model.config.num_attention_heads,
            head_dim=model.config.attention_head_dim,
            seq_len=state.ctx.world_size,
            dtype=torch.float32,
        )
    processors = dict(model.attn_processors)  # {"transformer_blocks.0.attn.processor": proc, ...}
    if any(isinstance(p, processor) for p in processors.values()):
        # A second wrapper would leave the first one's processors reading the wrong state.
        raise ValueError(
            f"parallelize({model_name}): this model is already parallelized; use the returned wrapper"
        )
    chosen = [name for name in processors if select(name)]
    unsupported = {
        name: type(processors[name]).__name__
        for name in chosen
        if type(processors[name]) is not replaces
    }
    if unsupported:
        raise ValueError(
            f"parallelize({model_name}) can only replace {replaces.__name__}; these blocks use "
            f"others: {unsupported}"
        )
    for name in chosen:
        processors[name] = processor(state, processors[name])
    model.set_attn_processor(processors)


def restore_attention_processors(module: torch.nn.Module) -> None:
    """Undo :func:`swap_attention_processors`: every :class:`SequenceParallelProcessor` of
    ``module`` is replaced by the processor it wrapped (the very object it replaced)."""
    model: Any = module
    processors = dict(model.attn_processors)
    if not any(isinstance(p, SequenceParallelProcessor) for p in processors.values()):
        return
    model.set_attn_processor(
        {
            name: proc.inner if isinstance(proc, SequenceParallelProcessor) else proc
            for name, proc in processors.items()
        }
    )
