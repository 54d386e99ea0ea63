"""Sequence-parallel plan for diffusers' ``CogVideoXTransformer3DModel`` (1.0 and 1.5).

CogVideoX takes the latent video [B, F, C, H, W]. ``patch_embed`` returns one stream
``cat([text, video])`` (with the 3-D sin-cos table added to the video part on 2B-style
configs) and ``forward`` cuts it into ``encoder_hidden_states`` (text) and ``hidden_states``
(video tokens [B, F*h*w, D], frame-major). The plan shards ``hidden_states`` on its way into
the first block (every later block gets the shard from the previous one) and gathers
``proj_out``'s output along dim 1 before the model's unpatchify (Note [Split inside the model]
in :mod:`sf_models.parallelize`). Text stays replicated. Positional tables added inside
``patch_embed`` act on the full grid before the split, so they are exact.

Attention is swapped through diffusers' processor hook: :class:`CogVideoXSequenceParallelProcessor`
replaces each ``CogVideoXAttnProcessor2_0``. Its plain-code equivalent is that processor; the
changes are the RoPE rows (Note [CogVideoX RoPE rows]) and the attention call::

    q, k, v = cat([text, video]) after projections, qk-norms, RoPE on video   # [B, T + N, H, D]
    out = sdpa(q, k, v)                                        # original: all tokens local
    -> video_out, text_out = parallel_attention(q[:, T:], ..., joint=(q[:, :T], ...))
    out = to_out(cat([text_out, video_out]))                    # same rows as the original
"""

from __future__ import annotations

import torch
from diffusers.models import attention_processor
from diffusers.models.embeddings import apply_rotary_emb

import sf_attn

from ._swap import SequenceParallelProcessor, project_qkv, swap_attention_processors
from .parallelize import SequenceParallelPlan, ShardState, register_plan

__all__ = ["COGVIDEOX_PLAN", "CogVideoXSequenceParallelProcessor"]

_VIDEO = "transformer_blocks.0.hidden_states"  # ShardState.lengths key of the video token count


class CogVideoXSequenceParallelProcessor(SequenceParallelProcessor):
    """``CogVideoXAttnProcessor2_0`` with the attention over the rank-split video sequence.

    (Arguments: see :class:`sf_models._swap.SequenceParallelProcessor`.)
    """

    # Attention.forward filters keyword arguments by this signature: keep the names.
    def __call__(
        self,
        attn: attention_processor.Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if not state.active:
            return self.inner(  # type: ignore[no-any-return]
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        if attention_mask is not None:
            raise ValueError(
                "parallelize(CogVideoX): attention_mask is not supported under sequence parallelism"
            )
        text_len = encoder_hidden_states.shape[1]
        seq_len = state.lengths[_VIDEO]

        stream = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, T + N_local, C]
        query, key, value = project_qkv(attn, stream)  # [B, T + N_local, H, D]

        text_q, query = query[:, :text_len], query[:, text_len:]
        text_k, key = key[:, :text_len], key[:, text_len:]
        text_v, value = value[:, :text_len], value[:, text_len:]
        if image_rotary_emb is not None:
            rows = _local_rows(image_rotary_emb, state, seq_len)
            query = apply_rotary_emb(query, rows, sequence_dim=1)  # type: ignore[arg-type, assignment]
            if not attn.is_cross_attention:
                key = apply_rotary_emb(key, rows, sequence_dim=1)  # type: ignore[arg-type, assignment]

        video_out, text_out = sf_attn.parallel_attention(
            query,
            key,
            value,
            ctx=state.ctx,
            strategy=state.strategy,
            joint=(text_q, text_k, text_v),
            seq_len=seq_len,
        )
        out = torch.cat([text_out, video_out], dim=1).flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
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
    """Swap every ``CogVideoXAttnProcessor2_0`` for a :class:`CogVideoXSequenceParallelProcessor`.

    Raises:
        ValueError: a block uses another processor (fused QKV, custom), the model is already
            parallelized, or ``state.strategy`` cannot split the model's heads on the
            context's topology (sf_attn's message).
    """
    swap_attention_processors(
        module,
        state,
        model_name="CogVideoX",
        replaces=attention_processor.CogVideoXAttnProcessor2_0,
        processor=CogVideoXSequenceParallelProcessor,
    )


COGVIDEOX_PLAN = SequenceParallelPlan(
    # Video tokens [B, F*h*w, D] after patch_embed split them from the text.
    split_module_inputs={"transformer_blocks.0": {"hidden_states": 1}},
    gather_module_outputs={"proj_out": 1},  # [B, F*h*w, p*p*C], before the unpatchify
    replicated_inputs={"encoder_hidden_states": 1},
    output_dims={},  # the output latent is already whole (gathered before unpatchify)
    attach=_attach,
)
register_plan("CogVideoXTransformer3DModel", COGVIDEOX_PLAN)


# Note [CogVideoX RoPE rows]
# CogVideoX's RoPE is not computed by the model: the pipeline passes ``image_rotary_emb`` =
# (cos, sin), [N, D] rows for the full frame-major video grid, and every block applies it to
# the video part of q/k. The forward argument stays whole (it is only a table) and each
# processor takes the rows of its rank's video chunk with the same tensor_split as the token
# split (a view, no copy), so each rank rotates exactly the tokens it holds.
