"""Sequence-parallel plan for diffusers' ``FluxTransformer2DModel``.

Image tokens (``hidden_states`` [B, img, C]) are split along dim 1 and their position ids
(``img_ids`` [img, 3]) along their rows, so the model's own ``pos_embed`` yields RoPE cos/sin
for the text rows plus this rank's image rows: exactly the rows of the q/k it holds (Note
[Flux RoPE rows]). Text tokens (``encoder_hidden_states`` [B, text, C], ``txt_ids``
[text, 3]) stay replicated, or with ``text="sharded"`` are split the same way, along dim 1 and
their rows (Note [Text layouts] in :mod:`sf_models.plan`). The output ``sample`` is gathered
along dim 1.

Attention is swapped through diffusers' processor hook: :class:`FluxSequenceParallelProcessor`
replaces each ``FluxAttnProcessor``. Its plain-code equivalent is ``FluxAttnProcessor``
itself; the one change is the attention call::

    q, k, v = cat([text, image_local]) after norms and RoPE   # [B, text + img_local, H, D]
    out = sdpa(q, k, v)                                       # original: all tokens local
    -> img_out, text_out = parallel_attention(q[:, text:], ..., joint=(q[:, :text], ...))
    out = cat([text_out, img_out])                            # same rows as the original

(with sharded text, ``text`` is this rank's text chunk and the call passes ``text="sharded"``.)
Dual-stream blocks project text and image separately and concatenate them in the processor;
single-stream blocks concatenate ``[text, image_local]`` before the processor. Both arrive as
one ``[text, image_local]`` stream, so one processor serves both: it cuts the stream at the
text length this rank holds (known from the block for dual-stream; for single-stream, the
call's full text length, or this rank's chunk of it with sharded text,
:meth:`~sf_models.plan.ShardState.text_rows`) and passes the text part as ``joint=``. The
single-stream block cuts its output at its local ``encoder_hidden_states.shape[1]``, which is
that same length.

CFG parallel (:mod:`sf_models.cfg`): ``FluxPipeline``'s true classifier-free guidance calls
the transformer twice per step, prompt then negative prompt (:data:`FLUX_CFG_PLAN`, "paired").
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers import transformer_flux

from ._swap import SequenceParallelProcessor, project_out, split_tokens, swap_attention_processors
from .cfg import CFGPlan, register_cfg_plan, true_cfg
from .plan import SequenceParallelPlan, register_plan

__all__ = ["FLUX_CFG_PLAN", "FLUX_PLAN", "FluxSequenceParallelProcessor"]


class FluxSequenceParallelProcessor(SequenceParallelProcessor):
    """``FluxAttnProcessor`` with the attention over the rank-split image sequence.

    (Arguments: see :class:`sf_models._swap.SequenceParallelProcessor`.)
    """

    model_name = "Flux"
    replaces = transformer_flux.FluxAttnProcessor
    seq_len_key = "hidden_states"

    def forward(
        self,
        attn: transformer_flux.FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, e_query, e_key, e_value = transformer_flux._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, seq, H, D]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            # Dual-stream block: the text stream has its own projections.
            text_len = encoder_hidden_states.shape[1]
            e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
            e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
            e_value = e_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([e_query, query], dim=1)  # [B, text_local + img_local, H, D]
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        else:
            # Single-stream block: hidden_states is already cat([text_local, image_local]),
            # text_local all of the text, or this rank's chunk of it (Note [Text layouts]).
            text_len = self.state.text_rows(self.text_len)
        if rotary is not None:
            # (cos, sin); diffusers annotates the argument as a 1-tuple.
            query = apply_rotary_emb(query, rotary, sequence_dim=1)  # type: ignore[arg-type]
            key = apply_rotary_emb(key, rotary, sequence_dim=1)  # type: ignore[arg-type]

        text, image = split_tokens((query, key, value), text_len)
        if self.text_len:  # sharded, a rank's text chunk may be empty: it still joins
            img_out, text_out = self.joint_attention(*image, text=text)
            out = torch.cat([text_out, img_out], dim=1)  # [B, text_local + img_local, H * D]
        else:
            out = self.self_attention(*image)

        if encoder_hidden_states is None:
            return out
        text_part, image_part = out[:, :text_len], out[:, text_len:]
        return project_out(attn, image_part.contiguous()), attn.to_add_out(text_part.contiguous())


FLUX_PLAN = SequenceParallelPlan(
    split_inputs={
        "hidden_states": 1,
        "img_ids": -2,
    },  # img_ids: [img, 3] (or deprecated [1, img, 3])
    replicated_inputs={"encoder_hidden_states": 1, "txt_ids": -2},
    # text="sharded": text tokens split like the image tokens (Note [Flux RoPE rows]).
    sharded_text_inputs={"encoder_hidden_states": 1, "txt_ids": -2},
    output_dims={0: 1},  # sample [B, img, C]
    # Per-image-token residuals would need splitting too; not planned yet.
    unsupported_inputs=("controlnet_block_samples", "controlnet_single_block_samples"),
    # Every FluxAttnProcessor (IP-Adapter and custom processors are refused).
    attach=partial(swap_attention_processors, processor=FluxSequenceParallelProcessor),
)
register_plan("FluxTransformer2DModel", FLUX_PLAN)


def _output_shape(config: Any, hidden: torch.Size) -> tuple[int, ...]:
    # tokens [B, seq, C_in] -> [B, seq, p * p * C_out]
    channels = config.out_channels or config.in_channels
    return (*hidden[:-1], config.patch_size**2 * channels)


# True CFG (a negative prompt): two transformer calls per step, cond then uncond.
FLUX_CFG_PLAN = CFGPlan(mode="paired", check=true_cfg, output_shape=_output_shape)
register_cfg_plan("FluxPipeline", FLUX_CFG_PLAN)


# Note [Flux RoPE rows]
# FluxTransformer2DModel.forward computes ``pos_embed(cat([txt_ids, img_ids]))``: cos/sin rows
# in the order [text, image]. With img_ids split by the same tensor_split as hidden_states,
# each rank's rows are [text, its image chunk], which is exactly the order of the q/k rows the
# processor holds (text first in both block kinds), so apply_rotary_emb needs no offsets and
# no rank ever computes RoPE for rows it does not own. With sharded text, txt_ids is split by
# the same tensor_split as encoder_hidden_states, so the rows are [its text chunk, its image
# chunk]: again the order of the q/k rows the processor holds (text_local first).
