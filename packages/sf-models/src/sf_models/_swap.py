"""Swapping a model's attention processors for sequence-parallel ones (shared by the plans)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import sf_attn

from .parallelize import ShardState


class SequenceParallelProcessor:
    """Base of the plans' attention processors.

    Args:
        state: the shared per-call state (context, strategy, input lengths).
        inner: the processor this one replaces; used while no parallel forward runs
            (Note [Inactive processors] in :mod:`sf_models.parallelize`).
    """

    def __init__(self, state: ShardState, inner: Any) -> None:
        self.state = state
        self.inner = inner


def project_qkv(
    attn: Any, x: torch.Tensor, *, added: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def swap_attention_processors(
    module: torch.nn.Module,
    state: ShardState,
    *,
    model_name: str,
    replaces: type,
    processor: type,
    select: Callable[[str], bool] = lambda name: True,
) -> None:
    """Replace every selected ``replaces`` processor by ``processor(state, old_processor)``.

    Args:
        module: the diffusers transformer (an AttentionMixin).
        state: the per-call state the new processors read.
        model_name: for messages, e.g. "Flux".
        replaces: the processor class the new processor knows how to stand in for.
        processor: the sequence-parallel processor class, built around the one it replaces.
        select: which processors (by their ``attn_processors`` name) to replace; the others
            stay (e.g. Wan's cross-attention, HunyuanVideo's token refiner).

    Raises:
        ValueError: the strategy cannot split the model's heads on the context's topology
            (sf_attn's message), the model is already parallelized, or a selected block uses
            another processor (IP-Adapter, fused QKV, custom).
    """
    model: Any = module
    if state.strategy != "auto":
        sf_attn.get_strategy(state.strategy).layout(
            state.ctx.topology, model.config.num_attention_heads
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
