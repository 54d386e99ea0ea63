"""Sequence-parallel plan for diffusers' ``WanTransformer3DModel`` (Wan 2.1; 2.2 T2V/I2V/TI2V).

Wan takes the latent video [B, C, F, H, W]; ``forward`` patchifies it inline (conv, flatten)
into video tokens [B, f*h*w, D], frame-major. The plan shards ``hidden_states`` on its way
into the first block and the output of ``rope`` ((cos, sin), each [1, f*h*w, 1, D] for the
full grid) along the token dim, and gathers ``proj_out``'s output along dim 1 before the
model's unpatchify (Note [Split inside the model] in :mod:`sf_models.parallelize`). So each
rank's RoPE rows are exactly those of the tokens it holds. Wan 2.2 TI2V passes a per-token
``timestep`` [B, f*h*w]; it is sharded the same way (Note [Wan per-token timestep]).

Each block has self-attention over the video tokens and cross-attention from the video tokens
to the (replicated) text, plus image tokens for I2V. Only self-attention needs communication:
:class:`WanSequenceParallelProcessor` replaces ``attn1``'s ``WanAttnProcessor``, with the
plain-code equivalent::

    q, k, v = projections, qk-norms, RoPE                    # [B, N, H, D]
    out = sdpa(q, k, v)                                      # original: all tokens local
    -> out = parallel_attention(q, k, v)                     # this rank's N_local queries

Cross-attention (``attn2``) keeps diffusers' own processor: its queries are this rank's video
tokens and its keys/values the full replicated text (and image) tokens, so running it on the
shard is already exact, local attention with no communication.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.transformers import transformer_wan as wan

import sf_attn

from ._swap import SequenceParallelProcessor, swap_attention_processors
from .parallelize import SequenceParallelPlan, ShardState, register_plan, rewrite_arguments_hook

__all__ = ["WAN_PLAN", "WanSequenceParallelProcessor"]

_VIDEO = "blocks.0.hidden_states"  # ShardState.lengths key of the video token count


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs (x[2i], x[2i+1]); cos/sin [1, N, 1, D] repeat each
    frequency twice, so the even entries of cos and the odd ones of sin are the pair's."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, N, H, D/2] each
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class WanSequenceParallelProcessor(SequenceParallelProcessor):
    """``WanAttnProcessor`` for self-attention (``attn1``) over the rank-split video sequence.

    (Arguments: see :class:`sf_models._swap.SequenceParallelProcessor`.)
    """

    def __call__(
        self,
        attn: wan.WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        state = self.state
        if not state.active:
            return self.inner(  # type: ignore[no-any-return]
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "parallelize(Wan): the self-attention processor got encoder_hidden_states or an "
                "attention_mask, which Wan's self-attention never passes"
            )
        query, key, value = wan._get_qkv_projections(attn, hidden_states, None)  # type: ignore[arg-type]
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, N_local, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:  # rows of this rank's tokens (rope output split)
            query = _rotate(query, *rotary_emb)
            key = _rotate(key, *rotary_emb)
        out = sf_attn.parallel_attention(
            query,
            key,
            value,
            ctx=state.ctx,
            strategy=state.strategy,
            seq_len=state.lengths[_VIDEO],
        )
        assert isinstance(out, torch.Tensor)  # no joint: one tensor back
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))  # type: ignore[no-any-return]


def _timestep_hook(model: Any, state: ShardState) -> Any:
    """Root forward pre-hook: shard a per-token ``timestep`` [B, f*h*w] like the tokens
    (Note [Wan per-token timestep])."""

    def shard_timestep(arguments: dict[str, Any]) -> bool:
        timestep = arguments.get("timestep")
        if not isinstance(timestep, torch.Tensor) or timestep.dim() != 2:
            return False
        latent = arguments["hidden_states"]
        tokens = math.prod(n // p for n, p in zip(latent.shape[2:], model.config.patch_size))
        if timestep.shape[1] != tokens:
            raise ValueError(
                f"parallelize(Wan): a per-token timestep must be [batch, {tokens}] (one per video "
                f"token), got {tuple(timestep.shape)}"
            )
        arguments["timestep"] = sf_attn.shard(timestep, state.ctx, 1)
        return True

    return rewrite_arguments_hook(state, model.forward, shard_timestep)


def _attach(module: torch.nn.Module, state: ShardState) -> None:
    """Swap every self-attention (``attn1``) ``WanAttnProcessor`` for a
    :class:`WanSequenceParallelProcessor`; cross-attention keeps its own.

    Raises:
        ValueError: a self-attention uses another processor, the model is already
            parallelized, or ``state.strategy`` cannot split the model's heads on the
            context's topology (sf_attn's message).
    """
    model: Any = module
    swap_attention_processors(
        module,
        state,
        model_name="Wan",
        replaces=wan.WanAttnProcessor,
        processor=WanSequenceParallelProcessor,
        select=lambda name: name.endswith(".attn1.processor"),
    )
    model.register_forward_pre_hook(_timestep_hook(model, state), with_kwargs=True)


WAN_PLAN = SequenceParallelPlan(
    split_module_inputs={"blocks.0": {"hidden_states": 1}},  # video tokens [B, f*h*w, D]
    split_module_outputs={"rope": 1},  # (cos, sin), each [1, f*h*w, 1, D]
    gather_module_outputs={"proj_out": 1},  # [B, f*h*w, p_t*p_h*p_w*C], before the unpatchify
    replicated_inputs={"encoder_hidden_states": 1},
    output_dims={},  # the output latent is already whole (gathered before unpatchify)
    attach=_attach,
)
register_plan("WanTransformer3DModel", WAN_PLAN)


# Note [Wan per-token timestep]
# Wan 2.2 TI2V gives every video token its own timestep ([B, f*h*w], frame-major like the
# tokens), which becomes per-token modulation [B, f*h*w, 6, D] in every block and [B, f*h*w, D]
# before proj_out. Sharding the timestep with the same tensor_split as the tokens makes all of
# these the rows of this rank's tokens; the per-token embedding MLP then runs on the shard only.
# A one-dimensional timestep [B] (Wan 2.1, 2.2 T2V/I2V) is left whole.
