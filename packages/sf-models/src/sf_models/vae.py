"""Exact parallel VAE decode: the latent split by rows across ranks, nothing approximated.

Plain code, and what every rank runs instead::

    image = vae.decode(z).sample                               # one process

    pvae = sf_models.parallelize(vae, ctx=ctx)                 # every rank, same weights
    image = pvae.decode(z).sample                              # the same z on every rank
    # every rank: ``image`` up to float32 rounding

Each rank decodes a contiguous band of latent rows (``torch.tensor_split`` of the height, so
any height and world size, uneven bands allowed) through the unchanged diffusers decoder,
with three kinds of hooks that make the band's result exactly the rows of the whole image:

- every convolution with a kernel taller than one row first receives ``k // 2`` halo rows
  from the bands above and below (zeros at the image's top and bottom, as the convolution's
  own padding), and its output is trimmed back to the band (Note [Halo rows]);
- every GroupNorm normalises with statistics over the whole image: per-rank sums and
  squared deviations are all-gathered in float32 and summed in rank order, two passes, so
  every rank uses the same mean and variance (not a per-band one: no seams);
- the decoder's self-attention (the mid block's) gives each band's queries the keys and
  values of every band (all-gathered; the attention matrix stays local to the queries).

Nearest-neighbour upsampling, 1x1 convolutions and per-pixel norms act on rows independently
and need nothing. The decoded bands are all-gathered, so every rank returns the whole image.

Supported, the VAEs of the five families:

- ``AutoencoderKL`` (Flux, SD3);
- ``AutoencoderKLCogVideoX``: its causal 3D convolutions keep their time cache per band (the
  cache is taken from the band's input before the hooked inner convolution, so it needs no
  halo of its own) and its spatial norms interpolate the band's latent to the band;
- ``AutoencoderKLHunyuanVideo``: its causal convolutions pad by replicating the edge row, so
  the halo beyond the image's edge is that row, not zeros; the mid block's attention carries
  a frame-causal mask, rebuilt for the band's queries against every band's keys;
- ``AutoencoderKLWan``: its causal convolutions get the halo on their frame cache too, and
  its per-frame attention gathers keys like the mid block's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn.functional as F

import sf_attn
import sf_comm

from ._fingerprint import fingerprint, same_fingerprint

__all__ = ["ParallelVAE", "parallelize_vae", "supported_vaes"]

_SUPPORTED = (
    "AutoencoderKL",
    "AutoencoderKLCogVideoX",
    "AutoencoderKLHunyuanVideo",
    "AutoencoderKLWan",
)


def supported_vaes() -> list[str]:
    """VAE class names :func:`parallelize_vae` accepts."""
    return list(_SUPPORTED)


@dataclasses.dataclass(slots=True)
class _Band:
    """This rank's band during a parallel decode (``active`` only inside ``decode``)."""

    ctx: sf_comm.CommContext
    active: bool = False

    @property
    def group(self) -> sf_comm.Group:
        return self.ctx.group("world")

    def halo(self, x: torch.Tensor, rows: int, edge: str = "zeros") -> torch.Tensor:
        """``x`` [..., h, W] with ``rows`` rows of the neighbouring bands above and below:
        [..., rows + h + rows, W]. Beyond the image's edges: zeros, or with ``edge=
        "replicate"`` the edge row repeated (what the convolution's padding would add)."""
        group = self.group
        top, bottom = x[..., :rows, :].contiguous(), x[..., -rows:, :].contiguous()
        from_above = sf_comm.shift(self.ctx, group, bottom, 1).wait()  # the band above's last
        from_below = sf_comm.shift(self.ctx, group, top, -1).wait()  # the band below's first
        if group.index == 0:
            from_above = (
                x[..., :1, :].expand_as(from_above)
                if edge == "replicate"
                else torch.zeros_like(from_above)
            )
        if group.index == group.size - 1:
            from_below = (
                x[..., -1:, :].expand_as(from_below)
                if edge == "replicate"
                else torch.zeros_like(from_below)
            )
        return torch.cat([from_above, x, from_below], dim=-2)

    def total(self, local: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``local`` (same shape everywhere), in rank order."""
        every = sf_comm.all_gather(self.ctx, self.group, local.contiguous()).wait()
        return torch.stack(every).sum(0)

    def gather_rows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every band's ``x`` concatenated along ``dim`` (bands may differ in size)."""
        sizes = self.total(
            F.one_hot(torch.tensor(self.group.index), self.group.size) * x.shape[dim]
        ).tolist()
        shapes = [(*x.shape[:dim], n, *x.shape[dim + 1 :]) for n in sizes]
        every = sf_comm.all_gather(self.ctx, self.group, x.contiguous(), shapes).wait()
        return torch.cat(every, dim=dim)


# Note [Halo rows]
# A convolution of kernel height k (stride 1, padding k // 2) reads k // 2 rows above and
# below each output row. With the band's input extended by k // 2 rows from each neighbour
# and the convolution's own zero padding left in place, the band's output has k // 2 extra
# rows at each end; trimming them leaves exactly the band's rows of the whole image's output.
# At the image's top and bottom the halo is zeros, so the trimmed rows see the zero rows the
# padding would have given. The pre-hook extends, the hook trims: the module is not touched.


def _halo_rows(module: torch.nn.Module) -> int:
    """Rows above and below an output row that a convolution reads (kernel height // 2)."""
    inner = getattr(module, "conv", module)  # HunyuanVideo's causal conv wraps a Conv3d
    kernel: tuple[int, ...] = getattr(inner, "kernel_size", (1, 1))
    return int(kernel[-2]) // 2


def _halo_edge(module: torch.nn.Module) -> str:
    """How the convolution pads at the image's edge: HunyuanVideo's causal convolutions
    replicate the edge row, the others add zeros."""
    return "replicate" if getattr(module, "pad_mode", "zeros") == "replicate" else "zeros"


def _conv_pre(band: _Band, module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
    rows = _halo_rows(module)
    if not band.active or rows == 0:
        return None
    if _halo_edge(module) == "replicate":
        return (band.halo(args[0], rows, "replicate"), *args[1:])
    # A causal video convolution's second argument is its frame cache: the last frames of
    # the band's previous input, which need the same halo (Note [Halo rows]).
    return tuple(band.halo(a, rows) if isinstance(a, torch.Tensor) else a for a in args)


def _conv_post(band: _Band, module: torch.nn.Module, args: Any, out: torch.Tensor) -> Any:
    rows = _halo_rows(module)
    if not band.active or rows == 0:
        return None
    return out[..., rows:-rows, :]


def _group_norm_post(band: _Band, module: torch.nn.GroupNorm, args: Any, out: Any) -> Any:
    """GroupNorm over the whole image: the same statistics on every band."""
    if not band.active:
        return None
    x = args[0]
    batch, channels = x.shape[:2]
    groups = module.num_groups
    xg = x.float().reshape(batch, groups, -1)
    count = band.total(torch.tensor([float(xg.shape[-1])], device=x.device))
    mean = band.total(xg.sum(-1)) / count  # [B, G]
    centred = xg - mean[..., None]
    var = band.total(centred.square().sum(-1)) / count
    y = (centred * torch.rsqrt(var[..., None] + module.eps)).reshape(x.shape)
    if module.affine:
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = y * module.weight.float().reshape(shape) + module.bias.float().reshape(shape)
    return y.to(x.dtype)


class _BandAttnProcessor:
    """The decoder's spatial self-attention for one band: its queries over every band's keys
    and values. Equivalent plain code (diffusers' processor on the whole image)::

        t = group_norm(x).flatten(2).transpose(1, 2)           # [B, H*W, C]
        o = sdpa(to_q(t), to_k(t), to_v(t))                    # heads of attn.heads
        x = (to_out(o).transpose(1, 2).reshape(x.shape) + x) / rescale
    """

    def __init__(self, band: _Band, original: Any) -> None:
        self.band = band
        self.original = original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> Any:
        if not self.band.active:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb=temb
            )
        if encoder_hidden_states is not None:
            raise ValueError("parallel VAE decode: the decoder's attention is self-attention")
        residual = hidden_states
        image = hidden_states.dim() == 4  # [B, C, h, W]; else tokens [B, L, C]
        if image:
            batch, channels, height, width = hidden_states.shape
            x = hidden_states.view(batch, channels, height * width)
        else:
            x = hidden_states.transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x)
        tokens = x.transpose(1, 2)  # [B, L_band, C]
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        heads = attn.heads
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))  # [B, L_band, heads, D]
        k_all = self.band.gather_rows(k, 1)  # [B, L, heads, D]
        v_all = self.band.gather_rows(v, 1)
        if attention_mask is None:
            out, _ = sf_attn.attention_with_lse(q, k_all, v_all)
        else:
            mask = self._frame_causal_mask(attention_mask, k_all.dtype)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask
            ).transpose(1, 2)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2).to(q.dtype)))
        if image:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _frame_causal_mask(self, local: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The band's queries x every band's keys of HunyuanVideo's frame-causal mask (a
        key is seen when its frame is not later than the query's), rebuilt from the band's
        own mask [B, L_band, L_band]: its rows tell each token's frame."""
        allowed = local[0] == 0  # [L_band, L_band]
        per_frame = int(allowed[0].sum())  # the first token (frame 0) sees frame 0's tokens
        frame = allowed.sum(-1) // per_frame - 1  # [L_band]
        key_frame = self.band.gather_rows(frame[None], 1)[0]  # [L], band after band
        visible = key_frame[None, :] <= frame[:, None]
        mask = torch.zeros(visible.shape, dtype=dtype, device=local.device)
        return mask.masked_fill(~visible, float("-inf"))[None, None]


def _wan_attention_post(band: _Band, module: Any, args: Any, out: Any) -> Any:
    """Wan's per-frame spatial self-attention for one band: its queries over every band's
    keys and values (the band's own-keys output is discarded). Equivalent plain code: the
    block's forward on the whole image."""
    if not band.active:
        return None
    x = args[0]
    batch, channels, time, height, width = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(batch * time, channels, height, width)
    qkv = module.to_qkv(module.norm(frames)).reshape(batch * time, 1, channels * 3, -1)
    q, k, v = qkv.permute(0, 1, 3, 2).contiguous().chunk(3, dim=-1)  # [B*T, 1, h*W, C]
    k_all, v_all = band.gather_rows(k, 2), band.gather_rows(v, 2)
    y = F.scaled_dot_product_attention(q, k_all, v_all)
    y = y.squeeze(1).permute(0, 2, 1).reshape(batch * time, channels, height, width)
    y = module.proj(y).view(batch, time, channels, height, width).permute(0, 2, 1, 3, 4)
    return y + x


class ParallelVAE(torch.nn.Module):
    """A VAE whose ``decode`` splits the latent's rows across ``ctx``'s ranks (see the
    module docstring); every other attribute is the wrapped VAE's."""

    def __init__(self, vae: Any, band: _Band, handles: list[Any], processors: list[Any]) -> None:
        super().__init__()
        self.vae = vae
        self._band = band
        self._handles = handles
        self._processors = processors

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["vae"], name)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any) -> Any:
        """``vae.decode(z)``, with ``z`` [B, C, H, W] (a video VAE: [B, C, F, H, W]) the same
        on every rank; every rank gets the whole decoded image or video.

        Raises:
            ValueError: fewer latent rows than ranks (each band needs a row), or the ranks
                were given different latents.
        """
        from diffusers.models.autoencoders.vae import DecoderOutput

        band, world = self._band, self._band.group.size
        rows = z.dim() - 2
        if z.shape[rows] < world:
            raise ValueError(
                f"parallel VAE decode: the latent has {z.shape[rows]} rows, fewer than the "
                f"{world} ranks (each decodes a band of at least one row); decode on fewer "
                f"ranks or a taller latent"
            )
        self._check_same_latent(z)
        mine = torch.tensor_split(z, world, dim=rows)[band.group.index]
        band.active = True
        try:
            local = self.vae.decode(mine, return_dict=False, **kwargs)[0]
        finally:
            band.active = False
        sample = band.gather_rows(local, rows)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def _check_same_latent(self, z: torch.Tensor) -> None:
        """Every rank must decode the same latent (each takes its band of it): compare a
        4-number fingerprint across the ranks, the same ValueError on all of them."""
        band = self._band
        every = band.gather_rows(fingerprint(z)[None], 0)  # [world, 4]
        differ = [r for r in range(band.group.size) if not same_fingerprint(every[0], every[r])]
        if differ:
            raise ValueError(
                f"parallel VAE decode: the ranks were given different latents (ranks {differ} "
                f"differ from rank 0); every rank must pass the same z (the same noise, seed "
                f"and steps)"
            )

    def close(self) -> Any:
        """Remove the hooks and processors; returns the VAE as it was."""
        for handle in self._handles:
            handle.remove()
        for attn, processor in self._processors:
            attn.set_processor(processor)
        self._handles, self._processors = [], []
        return self.vae


def parallelize_vae(vae: Any, *, ctx: sf_comm.CommContext) -> ParallelVAE:
    """:func:`sf_models.parallelize` for a diffusers VAE (see the module docstring).

    Raises:
        ValueError: the VAE class is not supported (the message lists those that are), or
            its decoder has a convolution this split does not handle (a stride other than 1).
    """
    from diffusers.models.attention_processor import Attention

    if type(vae).__name__ not in _SUPPORTED:
        raise ValueError(
            f"parallelize: no parallel decode for {type(vae).__name__}; supported VAEs: "
            f"{supported_vaes()}"
        )
    band = _Band(ctx=ctx)
    handles: list[Any] = []
    processors: list[Any] = []
    wrapped: set[int] = set()  # inner convolutions whose wrapper is hooked instead
    for name, module in vae.decoder.named_modules():
        if id(module) in wrapped:
            continue
        if type(module).__name__ == "HunyuanVideoCausalConv3d":
            # pads by hand (F.pad, replicate) before an unpadded Conv3d: hook the wrapper
            wrapped.add(id(module.conv))
            if _halo_rows(module) > 0:
                handles.append(module.register_forward_pre_hook(lambda m, a: _conv_pre(band, m, a)))
                handles.append(
                    module.register_forward_hook(lambda m, a, o: _conv_post(band, m, a, o))
                )
            continue
        if isinstance(module, torch.nn.Conv2d | torch.nn.Conv3d) and _halo_rows(module) > 0:
            # a causal video convolution pads by hand (``_padding``: W, W, H, H, T, 0)
            padding = getattr(module, "_padding", None)
            row_padding = padding[2] if padding is not None else module.padding[-2]
            if module.stride[-2] != 1 or row_padding != _halo_rows(module):
                raise ValueError(
                    f"parallelize: decoder.{name} has stride {module.stride} / row padding "
                    f"{row_padding}; the row split handles stride 1 with 'same' padding"
                )
            handles.append(module.register_forward_pre_hook(lambda m, a: _conv_pre(band, m, a)))
            handles.append(module.register_forward_hook(lambda m, a, o: _conv_post(band, m, a, o)))
        elif type(module).__name__ == "WanAttentionBlock":
            handles.append(
                module.register_forward_hook(lambda m, a, o: _wan_attention_post(band, m, a, o))
            )
        elif isinstance(module, torch.nn.GroupNorm):
            handles.append(
                module.register_forward_hook(lambda m, a, o: _group_norm_post(band, m, a, o))
            )
        elif isinstance(module, Attention):
            processors.append((module, module.processor))
            module.set_processor(cast(Any, _BandAttnProcessor(band, module.processor)))
    return ParallelVAE(vae, band, handles, processors)
