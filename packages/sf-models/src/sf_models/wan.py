"""Sequence-parallel plan for diffusers' ``WanTransformer3DModel`` (Wan 2.1; 2.2 T2V/I2V/TI2V).

Wan takes the latent video [B, C, F, H, W]; ``forward`` patchifies it inline (conv, flatten)
into video tokens [B, f*h*w, D], frame-major. The plan shards ``hidden_states`` on its way
into the first block and the output of ``rope`` ((cos, sin), each [1, f*h*w, 1, D] for the
full grid) along the token dim, and gathers ``proj_out``'s output along dim 1 before the
model's unpatchify (Note [Split inside the model] in :mod:`sf_models.plan`). So each
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

CFG parallel (:mod:`sf_models.cfg`): ``WanPipeline`` calls the transformer twice per step,
prompt then negative prompt (:data:`WAN_CFG_PLAN`, "paired").
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.transformers import transformer_wan as wan

import sf_attn

from ._hooks import rewrite_arguments_hook
from ._swap import SequenceParallelProcessor, project_out, swap_attention_processors
from .cfg import CFGPlan, channels_first_output_shape, guidance_scale_above_one, register_cfg_plan
from .plan import SequenceParallelPlan, ShardState, register_plan

__all__ = ["WAN_CFG_PLAN", "WAN_PLAN", "WanSequenceParallelProcessor"]

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

    (Arguments: see :class:`sf_models._swap.SequenceParallelProcessor`; ``WanAttention``
    passes its ``rotary_emb`` positionally, as the fifth argument.)
    """

    model_name = "Wan"
    replaces = wan.WanAttnProcessor
    seq_len_key = _VIDEO

    def check(
        self, encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> None:
        """Self-attention only: neither text tokens nor a mask."""
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "parallelize(Wan): the self-attention processor got encoder_hidden_states or an "
                "attention_mask, which Wan's self-attention never passes"
            )

    def forward(
        self,
        attn: wan.WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: None,
        attention_mask: None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        query, key, value = wan._get_qkv_projections(attn, hidden_states, None)  # type: ignore[arg-type]
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, N_local, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary is not None:  # rows of this rank's tokens (rope output split)
            query = _rotate(query, *rotary)
            key = _rotate(key, *rotary)
        return project_out(attn, self.self_attention(query, key, value))


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
        processor=WanSequenceParallelProcessor,
        select=lambda name: name.endswith(".attn1.processor"),
    )
    hook = _timestep_hook(model, state)
    state.hooks.append(model.register_forward_pre_hook(hook, with_kwargs=True))


WAN_PLAN = SequenceParallelPlan(
    split_module_inputs={"blocks.0": {"hidden_states": 1}},  # video tokens [B, f*h*w, D]
    split_module_outputs={"rope": 1},  # (cos, sin), each [1, f*h*w, 1, D]
    gather_module_outputs={"proj_out": 1},  # [B, f*h*w, p_t*p_h*p_w*C], before the unpatchify
    patch_convolutions={"patch_embedding": "blocks.0.hidden_states"},
    replicated_inputs={"encoder_hidden_states": 1},
    output_dims={},  # the output latent is already whole (gathered before unpatchify)
    attach=_attach,
)
register_plan("WanTransformer3DModel", WAN_PLAN)

WAN_CFG_PLAN = CFGPlan(
    mode="paired", check=guidance_scale_above_one, output_shape=channels_first_output_shape
)
register_cfg_plan("WanPipeline", WAN_CFG_PLAN)


# Note [Wan per-token timestep]
# Wan 2.2 TI2V gives every video token its own timestep ([B, f*h*w], frame-major like the
# tokens), which becomes per-token modulation [B, f*h*w, 6, D] in every block and [B, f*h*w, D]
# before proj_out. Sharding the timestep with the same tensor_split as the tokens makes all of
# these the rows of this rank's tokens; the per-token embedding MLP then runs on the shard only.
# A one-dimensional timestep [B] (Wan 2.1, 2.2 T2V/I2V) is left whole.
