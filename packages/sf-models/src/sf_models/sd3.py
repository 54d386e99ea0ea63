"""Sequence-parallel plan for diffusers' ``SD3Transformer2DModel`` (SD3 and SD3.5).

SD3 takes the latent [B, C, H, W] and patchifies inside ``forward``; ``pos_embed`` (a
``PatchEmbed``: conv + cropped 2-D sin-cos table for the whole grid) returns the image tokens
[B, img, D]. Under the plan it returns this rank's tokens only: its convolution embeds only
this rank's patches and its cropped table is cut to the same rows (Note [Sharded patch
embedding] in :mod:`sf_models.plan`); the plan gathers ``proj_out``'s output [B, img, p*p*C]
along dim 1, so the model's own unpatchify sees every token (Note [Split inside the model]). Text tokens (``encoder_hidden_states``) stay
replicated, or with ``text="sharded"`` are split along dim 1 at the forward input: every
layer of the text stream outside the attention (``context_embedder``, the blocks' norms,
projections and MLPs) is per-token (Note [Text layouts] in :mod:`sf_models.plan`). SD3 has no
RoPE: the positional table is cropped for the whole grid and then cut to this rank's rows,
so each token gets its own row.

Attention is swapped through diffusers' processor hook: :class:`SD3SequenceParallelProcessor`
replaces each ``JointAttnProcessor2_0``. Its plain-code equivalent is ``JointAttnProcessor2_0``;
the one change is the attention call::

    q, k, v = cat([image, text]) after projections and qk-norms    # [B, img + text, H, D]
    out = sdpa(q, k, v)                                            # original: all tokens local
    -> img_out, text_out = parallel_attention(q_img, k_img, v_img, joint=(q_txt, k_txt, v_txt))

(with sharded text, ``q_txt``... are this rank's text chunk and ``text_out`` its rows.)

The SD3.5 second attention (``attn2``, image tokens only, ``encoder_hidden_states=None``) is
the same call without ``joint``. The last block is ``context_pre_only``: like the original,
its text output is computed and then dropped by the block.

CFG parallel (:mod:`sf_models.cfg`): ``StableDiffusion3Pipeline`` runs guidance as one
transformer call on the batch ``[uncond; cond]`` (:data:`SD3_CFG_PLAN`, "batched").
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models import attention_processor

import sf_attn

from ._hooks import MethodOverride
from ._swap import (
    SequenceParallelProcessor,
    project_out,
    project_qkv,
    swap_attention_processors,
)
from .cfg import CFGPlan, guidance_scale_above_one, register_cfg_plan
from .plan import SequenceParallelPlan, ShardState, register_plan

__all__ = ["SD3_CFG_PLAN", "SD3_PLAN", "SD3SequenceParallelProcessor"]

_IMAGE = "pos_embed"  # ShardState.lengths key of the image token count


class SD3SequenceParallelProcessor(SequenceParallelProcessor):
    """``JointAttnProcessor2_0`` with the attention over the rank-split image sequence.

    (Arguments: see :class:`sf_models._swap.SequenceParallelProcessor`.)
    """

    model_name = "SD3"
    replaces = attention_processor.JointAttnProcessor2_0
    seq_len_key = _IMAGE

    # Attention.forward filters keyword arguments by this signature: keep JointAttnProcessor2_0's.
    def __call__(
        self,
        attn: attention_processor.Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.state.active:
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
            )
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)

    def forward(
        self,
        attn: attention_processor.Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: None,
        rotary: None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value = project_qkv(attn, hidden_states)  # [B, img_local, H, D]

        if encoder_hidden_states is None:  # SD3.5 attn2: image tokens only
            return project_out(attn, self.self_attention(query, key, value))

        text = project_qkv(attn, encoder_hidden_states, added=True)  # [B, text_local, H, D]
        img_out, text_out = self.joint_attention(query, key, value, text=text)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return project_out(attn, img_out), text_out


def _attach(module: torch.nn.Module, state: ShardState) -> None:
    """Swap the joint attention processors; make the patch embedding's sin-cos table this
    rank's rows (Note [Sharded patch embedding]: its convolution embeds this rank's patches
    only, and the table is added inside the embedding module).

    Raises:
        ValueError: as :func:`swap_attention_processors`, or the patch embedding has no
            ``pos_embed_max_size`` (a table the plan cannot reach).
    """
    embed: Any = module.get_submodule(_IMAGE)
    if embed.pos_embed is not None and embed.pos_embed_max_size is None:
        raise ValueError(
            "parallelize: this SD3 patch embedding has no pos_embed_max_size (SD3 and SD3.5 "
            "set it); the sharded patch embedding crops its sin-cos table through it"
        )
    swap_attention_processors(module, state, processor=SD3SequenceParallelProcessor)

    def shard_rows(cropped: Any) -> Any:
        def cropped_pos_embed(height: int, width: int) -> torch.Tensor:
            table = cropped(height, width)  # [1, img, D]: the whole grid's rows
            return sf_attn.shard(table, state.ctx, 1) if state.active else table

        return cropped_pos_embed

    state.hooks.append(MethodOverride(embed, "cropped_pos_embed", shard_rows))


SD3_PLAN = SequenceParallelPlan(
    split_module_outputs={_IMAGE: 1},  # image tokens [B, img, D] (+ sin-cos table)
    patch_convolutions={f"{_IMAGE}.proj": _IMAGE},
    gather_module_outputs={"proj_out": 1},  # [B, img, p*p*C], before the unpatchify
    replicated_inputs={"encoder_hidden_states": 1},
    sharded_text_inputs={"encoder_hidden_states": 1},  # text="sharded": [B, text, C] split
    output_dims={},  # the output latent is already whole (gathered before unpatchify)
    # Per-image-token residuals would need splitting too; not planned yet.
    unsupported_inputs=("block_controlnet_hidden_states",),
    # Every JointAttnProcessor2_0 (IP-Adapter, fused QKV and custom processors are refused).
    attach=_attach,
)
register_plan("SD3Transformer2DModel", SD3_PLAN)

SD3_CFG_PLAN = CFGPlan(
    mode="batched",
    check=guidance_scale_above_one,
    batched_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
)
register_cfg_plan("StableDiffusion3Pipeline", SD3_CFG_PLAN)
