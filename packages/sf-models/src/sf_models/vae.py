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
  values of every band, one band at a time in a ring pass (sf_attn's attention with
  log-sum-exp and its online-softmax merge), so no rank holds the whole image's keys.

Nearest-neighbour upsampling, 1x1 convolutions and per-pixel norms act on rows independently
and need nothing. The decoded bands are all-gathered, so every rank returns the whole image.

Supported, the VAEs of the five families:

- ``AutoencoderKL`` (Flux, SD3);
- ``AutoencoderKLCogVideoX``: its causal 3D convolutions keep their time cache per band (the
  cache is taken from the band's input before the hooked inner convolution, so it needs no
  halo of its own) and its spatial norms interpolate the band's latent to the band;
- ``AutoencoderKLHunyuanVideo``: its causal convolutions pad by replicating the edge row, so
  the halo beyond the image's edge is that row, not zeros; the mid block's attention carries
  a frame-causal mask: each query frame attends to the prefix of every band's keys up to its
  own frame;
- ``AutoencoderKLWan``: its causal convolutions get the halo on their frame cache too, and
  its per-frame attention visits every band's keys like the mid block's.
"""

from __future__ import annotations

import dataclasses
import warnings
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


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HEADER = 8  # dtype, ndim, up to 6 dims


def supported_vaes() -> list[str]:
    """VAE class names :func:`parallelize_vae` accepts."""
    return list(_SUPPORTED)


@dataclasses.dataclass(slots=True)
class _Band:
    """This rank's band during a parallel decode (``active`` only inside ``decode``); the
    bands are those of ``members`` (the world, or its first ranks: Note [Fewer bands])."""

    ctx: sf_comm.CommContext
    active: bool = False
    members: sf_comm.Group | None = None

    @property
    def group(self) -> sf_comm.Group:
        return self.members if self.members is not None else self.ctx.group("world")

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

    def sizes(self, n: int) -> list[int]:
        """Every band's ``n`` (this band's is ``n``), in band order."""
        return [
            int(v)
            for v in self.total(F.one_hot(torch.tensor(self.group.index), self.group.size) * n)
        ]

    def gather_rows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every band's ``x`` concatenated along ``dim`` (bands may differ in size)."""
        shapes = [(*x.shape[:dim], n, *x.shape[dim + 1 :]) for n in self.sizes(x.shape[dim])]
        every = sf_comm.all_gather(self.ctx, self.group, x.contiguous(), shapes).wait()
        return torch.cat(every, dim=dim)

    def attend_all(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int = 0
    ) -> torch.Tensor:
        """Attention of this band's queries over every band's keys and values, one band's
        K/V at a time: a ring pass in which the next band's K/V travel while this one is
        computed, so a rank holds two bands' K/V, never the whole image's. Layout
        [B, L_band, heads, D] (sf_attn's); with ``frames`` > 0 the tokens are frame-major
        (``frames`` frames per band) and a query sees only keys of frames not later than its
        own (HunyuanVideo's frame-causal mask). Equivalent plain code::

            k_all, v_all = (cat of every band's k), (cat of every band's v)
            out = sdpa(q, k_all, v_all)     # with frames: mask[i, j] = frame(j) <= frame(i)
        """
        group, me = self.group, self.group.index
        sizes = self.sizes(k.shape[1])
        block = torch.cat([k, v], dim=-1)  # one message per step
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
        for step in range(group.size):
            owner = (me - step) % group.size
            incoming = None
            if step < group.size - 1:  # the band after this one, while this one is computed
                source = (me - step - 1) % group.size
                shape = (block.shape[0], sizes[source], *block.shape[2:])
                incoming = sf_comm.shift(self.ctx, group, block, 1, out_shape=shape)
            k_blk, v_blk = block.split(k.shape[-1], dim=-1)
            for rows, (o, o_lse) in _frame_causal_blocks(q, k_blk, v_blk, frames, sizes[owner]):
                sf_attn.merge_attention_(out[:, rows], lse[..., rows], o.float(), o_lse)
            if incoming is not None:
                block = incoming.wait()
        return out.to(q.dtype)


def _frame_causal_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, keys: int
) -> Any:
    """``(query rows, (out, lse))`` of the queries against one band's ``keys`` keys: all of
    them at once, or with ``frames`` (frame-major tokens) each query frame against the keys
    of its own and earlier frames, a prefix of the band's (so no mask is built)."""
    if frames == 0:
        yield slice(None), sf_attn.attention_with_lse(q, k, v)
        return
    per_query_frame, per_key_frame = q.shape[1] // frames, keys // frames
    for f in range(frames):
        rows = slice(f * per_query_frame, (f + 1) * per_query_frame)
        visible = (f + 1) * per_key_frame
        yield rows, sf_attn.attention_with_lse(q[:, rows], k[:, :visible], v[:, :visible])


# Note [Fewer bands]
# A band must be at least as tall as the largest halo it lends its neighbours (one latent row
# for the 3x3 convolutions of every supported decoder; bands only grow with upsampling), so a
# latent of R rows splits into at most R // halo bands. With fewer than one per rank, the
# first R // halo ranks decode (their own group: the halos, norms and attention see only
# them) and rank 0 sends the image to the others, which wait. It is said once per shape,
# on rank 0, as a warning: the decode is still exact, only less parallel.


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
        frames = 0 if attention_mask is None else _frames(attention_mask)
        out = self.band.attend_all(q, k, v, frames)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2).to(q.dtype)))
        if image:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _frames(mask: torch.Tensor) -> int:
    """The number of frames of HunyuanVideo's frame-causal mask [B, L_band, L_band] (0 =
    attend): the band's first token (frame 0) sees exactly the first frame's tokens."""
    per_frame = int((mask[0, 0] == 0).sum())
    return mask.shape[-1] // per_frame


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
    q, k, v = qkv.permute(0, 3, 1, 2).chunk(3, dim=-1)  # [B*T, h*W, 1, C]: sf_attn's layout
    y = band.attend_all(q.contiguous(), k.contiguous(), v.contiguous())
    y = y.squeeze(2).permute(0, 2, 1).reshape(batch * time, channels, height, width)
    y = module.proj(y).view(batch, time, channels, height, width).permute(0, 2, 1, 3, 4)
    return y + x


class ParallelVAE(torch.nn.Module):
    """A VAE whose ``decode`` splits the latent's rows across ``ctx``'s ranks (see the
    module docstring); every other attribute is the wrapped VAE's."""

    def __init__(
        self, vae: Any, band: _Band, handles: list[Any], processors: list[Any], min_rows: int
    ) -> None:
        super().__init__()
        self.vae = vae
        self._band = band
        self._min_rows = min_rows  # latent rows a band needs: the largest halo, at least 1
        self._warned: set[tuple[int, int]] = set()
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
        on every rank; every rank gets the whole decoded image or video. A latent with too
        few rows for a band per rank is decoded by the first ranks only, with a warning
        (Note [Fewer bands]).

        Raises:
            ValueError: the ranks were given different latents.
        """
        from diffusers.models.autoencoders.vae import DecoderOutput

        band, world = self._band, self._band.ctx.group("world")
        dim = z.dim() - 2
        self._check_same_latent(z)
        bands = max(1, min(world.size, z.shape[dim] // self._min_rows))
        if bands < world.size:
            band.members = self._first_ranks(bands, z.shape[dim])
        try:
            if world.index < bands:
                mine = torch.tensor_split(z, bands, dim=dim)[world.index]
                band.active = True
                try:
                    local = self.vae.decode(mine, return_dict=False, **kwargs)[0]
                finally:
                    band.active = False
                sample = band.gather_rows(local, dim)
            else:
                sample = None
            if bands < world.size:
                sample = self._to_the_others(sample, bands)
        finally:
            band.members = None
        assert sample is not None  # every rank decoded, or was sent rank 0's image
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def _first_ranks(self, bands: int, rows: int) -> sf_comm.Group:
        """The group of the first ``bands`` ranks (the others alone), saying so once."""
        ctx, world = self._band.ctx, self._band.ctx.group("world")
        if world.index == 0 and (bands, rows) not in self._warned:
            self._warned.add((bands, rows))
            warnings.warn(
                f"parallel VAE decode: the latent has {rows} rows, too few for {world.size} "
                f"bands of at least {self._min_rows}; decoding on the first {bands} ranks",
                stacklevel=3,
            )
        partition = [list(range(bands)), *([r] for r in range(bands, world.size))]
        return ctx.subgroup(partition, name=f"vae-bands-{bands}")

    def _to_the_others(self, sample: torch.Tensor | None, bands: int) -> torch.Tensor:
        """Rank 0's decoded ``sample`` on the ranks that decoded nothing (a header with its
        shape and dtype first)."""
        ctx, world = self._band.ctx, self._band.ctx.group("world")
        idle = world.ranks[bands:]
        if world.index == 0:
            assert sample is not None
            header = torch.tensor(
                [_DTYPES.index(sample.dtype), sample.dim(), *sample.shape], device=sample.device
            )
            header = F.pad(header, (0, _HEADER - header.numel()))
            ctx.transport.exchange(world, [(r, header) for r in idle], [], op="vae_header").wait()
            ctx.transport.exchange(world, [(r, sample) for r in idle], [], op="vae_sample").wait()
            return sample
        if sample is not None:
            return sample
        source = world.ranks[0]
        recv = [(source, torch.Size([_HEADER]), torch.int64)]
        (header,) = ctx.transport.exchange(world, [], recv, op="vae_header").wait()
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        shape = torch.Size(int(n) for n in header[2 : 2 + ndim])
        (got,) = ctx.transport.exchange(world, [], [(source, shape, dtype)], op="vae_sample").wait()
        return got

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
    halos = [
        _halo_rows(m)
        for m in vae.decoder.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)
    ]
    return ParallelVAE(vae, band, handles, processors, max([1, *halos]))
