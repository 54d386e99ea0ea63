"""Sequence-parallel plan for diffusers' ``CogVideoXTransformer3DModel`` (1.0 and 1.5).

CogVideoX takes the latent video [B, F, C, H, W]. ``patch_embed`` returns one stream
``cat([text, video])`` (with the 3-D sin-cos table added to the video part on 2B-style
configs) and ``forward`` cuts it into ``encoder_hidden_states`` (text) and ``hidden_states``
(video tokens [B, F*h*w, D], frame-major). The plan shards ``hidden_states`` on its way into
the first block (every later block gets the shard from the previous one) and gathers
``proj_out``'s output along dim 1 before the model's unpatchify (Note [Split inside the model]
in :mod:`sf_models.plan`). Text stays replicated, or with ``text="sharded"`` is split on
the same way in (``encoder_hidden_states``; Note [Text layouts] in :mod:`sf_models.plan`):
the blocks are per-token outside the attention and read their text length from the tensor,
RoPE covers the video only, and the text stream is dropped after the last block. Positional
tables added inside ``patch_embed`` act on the full grid before the split, so they are exact.

Attention is swapped through diffusers' processor hook: :class:`CogVideoXSequenceParallelProcessor`
replaces each ``CogVideoXAttnProcessor2_0``. Its plain-code equivalent is that processor; the
changes are the RoPE rows (Note [CogVideoX RoPE rows]) and the attention call::

    q, k, v = cat([text, video]) after projections, qk-norms, RoPE on video   # [B, T + N, H, D]
    out = sdpa(q, k, v)                                        # original: all tokens local
    -> video_out, text_out = parallel_attention(q[:, T:], ..., joint=(q[:, :T], ...))
    out = to_out(cat([text_out, video_out]))                    # same rows as the original

CFG parallel (:mod:`sf_models.cfg`): ``CogVideoXPipeline`` runs guidance as one transformer
call on the batch ``[uncond; cond]`` (:data:`COGVIDEOX_CFG_PLAN`, "batched").
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from diffusers.models import attention_processor
from diffusers.models.embeddings import apply_rotary_emb

import sf_attn

from ._swap import (
    SequenceParallelProcessor,
    project_out,
    project_qkv,
    split_tokens,
    swap_attention_processors,
)
from .cfg import CFGPlan, guidance_scale_above_one, register_cfg_plan
from .plan import SequenceParallelPlan, ShardState, register_plan

__all__ = ["COGVIDEOX_CFG_PLAN", "COGVIDEOX_PLAN", "CogVideoXSequenceParallelProcessor"]

_VIDEO = "transformer_blocks.0.hidden_states"  # ShardState.lengths key of the video token count
_TEXT = "transformer_blocks.0.encoder_hidden_states"  # ... of the text token count (sharded)


class CogVideoXSequenceParallelProcessor(SequenceParallelProcessor):
    """``CogVideoXAttnProcessor2_0`` with the attention over the rank-split video sequence.

    (Arguments: see :class:`sf_models._swap.SequenceParallelProcessor`.)
    """

    model_name = "CogVideoX"
    replaces = attention_processor.CogVideoXAttnProcessor2_0
    seq_len_key = _VIDEO
    text_len_key = _TEXT

    def forward(
        self,
        attn: attention_processor.Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_len = encoder_hidden_states.shape[1]
        stream = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, T + N_local, C]
        # [B, T + N_local, H, D] -> text [B, T, H, D] and video [B, N_local, H, D]
        text, (query, key, value) = split_tokens(project_qkv(attn, stream), text_len)
        if rotary is not None:
            rows = _local_rows(rotary, self.state, self.seq_len)
            query = apply_rotary_emb(query, rows, sequence_dim=1)  # type: ignore[arg-type, assignment]
            if not attn.is_cross_attention:
                key = apply_rotary_emb(key, rows, sequence_dim=1)  # type: ignore[arg-type, assignment]

        video_out, text_out = self.joint_attention(query, key, value, text=text)
        out = project_out(attn, torch.cat([text_out, video_out], dim=1))
        return out[:, text_len:], out[:, :text_len]


def _local_rows(
    rotary: tuple[torch.Tensor, torch.Tensor], state: ShardState, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the full-grid RoPE (cos, sin) [N, D] (Note [CogVideoX RoPE rows])."""
    cos, sin = rotary
    if cos.shape[0] != seq_len:
        raise ValueError(
            f"parallelize(CogVideoX): image_rotary_emb has {cos.shape[0]} rows, but the video "
            f"has {seq_len} tokens; pass the RoPE of the full latent grid"
        )
    ctx = state.ctx
    return cos.tensor_split(ctx.world_size)[ctx.rank], sin.tensor_split(ctx.world_size)[ctx.rank]


def _attach(module: torch.nn.Module, state: ShardState) -> None:
    """Swap the attention processors; for CogVideoX 1.5, whose patch embedding is a linear map
    of pre-flattened patches [B, tokens, p_t*p*p*C] with no positional table, give that
    linear only this rank's patches (Note [Sharded patch embedding] in :mod:`sf_models.plan`).
    CogVideoX 1.0's convolution runs on frames folded into the batch, so it embeds every
    patch and the plan splits the tokens at the first block, as before.

    Raises:
        ValueError: as :func:`swap_attention_processors`.
    """
    swap_attention_processors(module, state, processor=CogVideoXSequenceParallelProcessor)
    embed: Any = module.get_submodule("patch_embed")
    table = embed.use_positional_embeddings or embed.use_learned_positional_embeddings
    if embed.patch_size_t is not None and not table:
        hook = partial(_shard_patches, state)
        state.hooks.append(embed.proj.register_forward_pre_hook(hook))


def _shard_patches(state: ShardState, linear: torch.nn.Module, args: Any) -> Any:
    """Pre-hook of CogVideoX 1.5's patch projection: this rank's rows of its input."""
    if not state.active:
        return None
    patches = args[0]  # [B, tokens, p_t*p*p*C], frame-major like the tokens
    state.presplit[_VIDEO] = patches.shape[1]
    return (sf_attn.shard(patches, state.ctx, 1), *args[1:])


COGVIDEOX_PLAN = SequenceParallelPlan(
    # Video tokens [B, F*h*w, D] after patch_embed split them from the text.
    split_module_inputs={"transformer_blocks.0": {"hidden_states": 1}},
    # text="sharded": the text tokens [B, T, D], cut from the same stream, split there too.
    sharded_text_module_inputs={"transformer_blocks.0": {"encoder_hidden_states": 1}},
    gather_module_outputs={"proj_out": 1},  # [B, F*h*w, p*p*C], before the unpatchify
    replicated_inputs={"encoder_hidden_states": 1},
    output_dims={},  # the output latent is already whole (gathered before unpatchify)
    # Every CogVideoXAttnProcessor2_0 (fused QKV and custom processors are refused).
    attach=_attach,
)
register_plan("CogVideoXTransformer3DModel", COGVIDEOX_PLAN)

COGVIDEOX_CFG_PLAN = CFGPlan(
    mode="batched",
    check=guidance_scale_above_one,
    # ``ofs`` ([1], CogVideoX 1.5) and ``image_rotary_emb`` ([seq, dim]) are not batched.
    batched_inputs=("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond"),
)
register_cfg_plan("CogVideoXPipeline", COGVIDEOX_CFG_PLAN)


# Note [CogVideoX RoPE rows]
# CogVideoX's RoPE is not computed by the model: the pipeline passes ``image_rotary_emb`` =
# (cos, sin), [N, D] rows for the full frame-major video grid, and every block applies it to
# the video part of q/k. The forward argument stays whole (it is only a table) and each
# processor takes the rows of its rank's video chunk with the same tensor_split as the token
# split (a view, no copy), so each rank rotates exactly the tokens it holds.
