"""Sequence-parallel plan for diffusers' ``HunyuanVideoTransformer3DModel``.

HunyuanVideo takes the latent video [B, C, F, H, W]. The plan shards the output of
``x_embedder`` (video tokens [B, f*h*w, D], frame-major) and of ``rope`` (cos, sin, [f*h*w, D]
for the full grid) along the token dim, and gathers ``proj_out``'s output along dim 1 before
the model's unpatchify (Note [Split inside the model] in :mod:`sf_models.plan`). So
each rank's RoPE rows are exactly those of the tokens it holds.

Text: ``context_embedder`` (the token refiner: self-attention over the prompt only, with its
own mask) runs on the replicated prompt on every rank, untouched. The model then builds a key
mask over ``[video, text]`` from the prompt mask; the video part is all True, so each
processor passes only its text part as ``joint_mask`` (Note [HunyuanVideo prompt mask]).
With ``text="sharded"`` the refiner's output is split like the video tokens (Note [Text
layouts] in :mod:`sf_models.plan`) and each processor passes the mask of its own text chunk,
taken from the prompt mask the refiner saw.

Attention is swapped through diffusers' processor hook: :class:`HunyuanVideoSequenceParallelProcessor`
replaces the ``HunyuanVideoAttnProcessor2_0`` of every dual- and single-stream block. Its
plain-code equivalent is that processor; the one change is the attention call::

    q, k, v = cat([video, text]) after projections, qk-norms, RoPE on video  # [B, N + T, H, D]
    out = sdpa(q, k, v, attn_mask=[video keys: True, text keys: prompt mask])
    -> video_out, text_out = parallel_attention(q[:, :N], ..., joint=(q[:, N:], ...),
                                                joint_mask=prompt key mask)

Image-to-video with ``image_condition_type="token_replace"`` treats the first frame's tokens
specially (``num_tokens`` of them, at the front of the sequence); the plan rewrites that count
to this rank's share of them (Note [HunyuanVideo first-frame tokens]).

CFG parallel (:mod:`sf_models.cfg`): ``HunyuanVideoPipeline``'s true classifier-free guidance
calls the transformer twice per step, prompt then negative prompt
(:data:`HUNYUANVIDEO_CFG_PLAN`, "paired").
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers import transformer_hunyuan_video as hunyuan

from sf_attn.sharding import chunk_offsets

from ._hooks import rewrite_arguments_hook
from ._swap import (
    SequenceParallelProcessor,
    project_out,
    project_qkv,
    split_tokens,
    swap_attention_processors,
)
from .cfg import CFGPlan, channels_first_output_shape, register_cfg_plan, true_cfg
from .plan import SequenceParallelPlan, ShardState, register_plan

__all__ = ["HUNYUANVIDEO_CFG_PLAN", "HUNYUANVIDEO_PLAN", "HunyuanVideoSequenceParallelProcessor"]

_VIDEO = "x_embedder"  # ShardState.lengths key of the video token count
_TEXT = "context_embedder"  # ... of the text token count (sharded text)
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


class HunyuanVideoSequenceParallelProcessor(SequenceParallelProcessor):
    """``HunyuanVideoAttnProcessor2_0`` with the attention over the rank-split video sequence.

    (Arguments: see :class:`sf_models._swap.SequenceParallelProcessor`.)
    """

    model_name = "HunyuanVideo"
    replaces = hunyuan.HunyuanVideoAttnProcessor2_0
    seq_len_key = _VIDEO
    text_len_key = _TEXT
    prompt: _PromptMask | None = None  # set by the plan's attach (sharded text)

    def check(
        self, encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> None:
        """The prompt mask is kept (Note [HunyuanVideo prompt mask]); the text is needed."""
        if encoder_hidden_states is None:
            raise ValueError("parallelize(HunyuanVideo): blocks must pass the text tokens")

    def forward(
        self,
        attn: Any,  # diffusers' Attention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        video_len = hidden_states.shape[1]
        text_len = encoder_hidden_states.shape[1]
        dual_stream = attn.add_q_proj is not None

        # Single-stream blocks project [video, text] with one set of weights, dual-stream ones
        # the text with its own (add_*_proj, norm_added_*): split after projecting either way.
        if dual_stream:
            query, key, value = project_qkv(attn, hidden_states)  # [B, N_local, H, D]
            text = project_qkv(attn, encoder_hidden_states, added=True)
        else:
            stream = torch.cat([hidden_states, encoder_hidden_states], 1)
            (query, key, value), text = split_tokens(project_qkv(attn, stream), video_len)
        if rotary is not None:  # rows of this rank's tokens (x_embedder/rope split)
            query = apply_rotary_emb(query, rotary, sequence_dim=1)  # type: ignore[arg-type, assignment]
            key = apply_rotary_emb(key, rotary, sequence_dim=1)  # type: ignore[arg-type, assignment]

        if self.state.text == "sharded":
            assert self.prompt is not None
            text_mask = self.prompt.chunk(self.state, self.text_len)
        else:
            text_mask = _text_key_mask(attention_mask, video_len, text_len)
        video_out, text_out = self.joint_attention(
            query, key, value, text=text, text_mask=text_mask
        )
        if getattr(attn, "to_out", None) is not None:
            video_out = project_out(attn, video_out)
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _text_key_mask(
    attention_mask: torch.Tensor | None, video_len: int, text_len: int
) -> torch.Tensor | None:
    """The text-key part [B, T] of the model's [B, 1, 1, N_local + T] key mask
    (Note [HunyuanVideo prompt mask])."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[1:3] != (1, 1):
        raise ValueError(
            "parallelize(HunyuanVideo): expected the model's key mask [B, 1, 1, video + text], "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.shape[-1] != video_len + text_len:
        raise ValueError(
            f"parallelize(HunyuanVideo): key mask covers {attention_mask.shape[-1]} tokens, "
            f"expected {video_len} video + {text_len} text on this rank"
        )
    return attention_mask[:, 0, 0, video_len:]


class _PromptMask:
    """The prompt's key mask as the model applies it, for sharded text (Note [HunyuanVideo
    prompt mask]): recorded from the refiner's input on every call."""

    def __init__(self) -> None:
        self.valid: torch.Tensor | None = None  # [B] valid (leading) prompt tokens

    def record(self, _: torch.nn.Module, args: Any, kwargs: Any) -> None:
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        self.valid = None if mask is None else mask.sum(dim=1)

    def chunk(self, state: ShardState, text_len: int) -> torch.Tensor | None:
        """This rank's [B, text_local] bool key mask (None: every prompt token attends)."""
        ctx = state.ctx
        if text_len < ctx.world_size:
            raise ValueError(
                f"parallelize(HunyuanVideo): text='sharded' needs a text token on every rank "
                f"(its single-stream blocks cut [video, text] at the text length), got "
                f"{text_len} text tokens over {ctx.world_size} ranks; use text='replicated'"
            )
        if self.valid is None:
            return None
        full = torch.arange(text_len, device=self.valid.device)[None] < self.valid[:, None]
        if bool(full.all()):  # the same on every rank: the full mask is known to all
            return None
        return full.tensor_split(ctx.world_size, dim=1)[ctx.rank]


def _first_frame_hook(state: ShardState, block: torch.nn.Module) -> Any:
    """Forward pre-hook: ``num_tokens`` (global first-frame token count) -> this rank's share
    (Note [HunyuanVideo first-frame tokens])."""

    def local_share(arguments: dict[str, Any]) -> bool:
        num_tokens = arguments.get("num_tokens")
        if num_tokens is None:
            return False
        ctx = state.ctx
        start = chunk_offsets(state.lengths[_VIDEO], ctx.world_size)[ctx.rank]
        local_len = arguments["hidden_states"].shape[1]
        arguments["num_tokens"] = max(0, min(int(num_tokens) - start, local_len))
        return True

    return rewrite_arguments_hook(state, block.forward, local_share)


def _attach(module: torch.nn.Module, state: ShardState) -> None:
    """Swap the joint-attention processors of the dual- and single-stream blocks for
    :class:`HunyuanVideoSequenceParallelProcessor`; the token refiner's stay.

    Raises:
        ValueError: a block uses another processor, the model is already parallelized, or
            ``state.strategy`` cannot split the model's heads on the context's topology
            (sf_attn's message).
    """
    model: Any = module
    swap_attention_processors(
        module,
        state,
        processor=HunyuanVideoSequenceParallelProcessor,
        select=lambda name: name.startswith(_BLOCK_LISTS),
    )
    prompt = _PromptMask()
    embedder = model.context_embedder
    state.hooks.append(embedder.register_forward_pre_hook(prompt.record, with_kwargs=True))
    for proc in model.attn_processors.values():
        if isinstance(proc, HunyuanVideoSequenceParallelProcessor):
            proc.prompt = prompt
    if model.config.image_condition_type == "token_replace":
        for block_list in _BLOCK_LISTS:
            for block in getattr(model, block_list):
                hook = _first_frame_hook(state, block)
                state.hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))


HUNYUANVIDEO_PLAN = SequenceParallelPlan(
    split_module_outputs={
        _VIDEO: 1,  # video tokens [B, f*h*w, D]
        "rope": 0,  # (cos, sin), each [f*h*w, D]
    },
    gather_module_outputs={"proj_out": 1},  # [B, f*h*w, p_t*p*p*C], before the unpatchify
    patch_convolutions={f"{_VIDEO}.proj": _VIDEO},
    replicated_inputs={"encoder_hidden_states": 1},
    # text="sharded": the refined prompt tokens [B, T, D] split as they leave the refiner.
    sharded_text_module_outputs={_TEXT: 1},
    output_dims={},  # the output latent is already whole (gathered before unpatchify)
    attach=_attach,
)
register_plan("HunyuanVideoTransformer3DModel", HUNYUANVIDEO_PLAN)

HUNYUANVIDEO_CFG_PLAN = CFGPlan(
    mode="paired", check=true_cfg, output_shape=channels_first_output_shape
)
register_cfg_plan("HunyuanVideoPipeline", HUNYUANVIDEO_CFG_PLAN)


# Note [HunyuanVideo prompt mask]
# HunyuanVideoTransformer3DModel.forward builds its attention mask after x_embedder, so under
# the split it is [B, 1, 1, N_local + T]: True for every video key and for the first
# ``encoder_attention_mask.sum()`` text keys (the model assumes the prompt's valid tokens come
# first; we keep its rule by reading its mask rather than the prompt mask). Only keys are
# masked, every query is computed, as in the original. The video part is True by
# construction, so the text part alone, passed as ``joint_mask``, reproduces it on every rank.
# With sharded text the model's mask is built from the local text length and so is wrong for
# every rank but the first (its rule is "the first ``valid`` text keys attend", counted from
# this rank's chunk); the processors instead take the global rule, ``arange(T) < valid``, from
# the prompt mask the refiner was called with, and pass their chunk of it: the mask travels
# with its tokens (Note [Sharded text] in sf_attn.joint).
#
# Note [HunyuanVideo first-frame tokens]
# The token-replace blocks modulate ``hidden_states[:, :num_tokens]`` (the first latent frame)
# with the clean-image timestep. Those tokens are a prefix of the global sequence, so on a
# rank holding tokens [start, start + n) they are the local prefix of length
# clamp(num_tokens - start, 0, n); the pre-hook passes that instead of the global count.
