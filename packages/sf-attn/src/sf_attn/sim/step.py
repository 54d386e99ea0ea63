"""Per-step latency of a whole DiT denoising step under sequence parallelism (no devices).

``simulate_step(model, topology, height=, width=, frames=)`` costs one transformer forward
(one denoising step, one sample) for every strategy and for ``auto``:

    step = sum over blocks of
             self-attention      sf_attn.sim.layer.simulate(strategy, ...) with the block's shape
           + split compute       GEMMs, norms, modulation of this rank's tokens (1/P of them)
           + replicated compute  the text tokens every rank repeats (they are not sharded)
           + cross-attention     local: this rank's queries x the replicated text (Wan)

The self-attention term is the simulator's (:mod:`sf_attn.sim.layer`: the strategy's own code
on meta tensors, links, overlap). The rest is Note [Step cost]. Every strategy shards the
tokens the same way, so only the attention term differs between strategies; that is why
``auto`` plans the attention layer alone with :func:`sf_attn.planner.plan_for` (per layer:
every self-attention block of these models has the same shape, so one plan covers them).

Note [Step cost]: a GEMM of ``m`` tokens through ``w`` weights takes
``2 m w / (device_flops * gemm_eff * m / (m + gemm_half))`` (``gemm_eff``: the MFU of compiled
projections/MLPs relative to ``Topology.device_flops``, the rate attention blocks get in the
simulator at head_dim 128; ``gemm_half``: rows at which a GEMM runs at half its large-``m``
rate). Everything elementwise (norms, adaLN modulation, gates, residuals, RoPE, the MLP
activation) is memory bound: ``(hidden_passes * hidden + ffn_passes * ffn) * itemsize``
bytes per token per block at the device's memory bandwidth. ``block_overhead`` is a fixed time per block (kernel
launches and gaps that compilation does not remove). The calibration that set these is in
docs/simulator.md (:func:`sf_attn.sim.calibration.xdit_flux_calibration`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import torch

from sf_comm import Topology

from ..strategies import baseline_strategy, get_strategy, strategy_names
from .layer import CostModel, kernel_rate, simulate
from .models import DiTConfig, get_model

# Achievable device-memory bandwidth of an elementwise kernel, bytes/s, ~80 % of the HBM
# peak (A100 80GB 2.04 TB/s, H100 SXM 3.35 TB/s, H200 4.8 TB/s). Topologies not listed
# (custom ones) use CostModel.mem_bw.
_MEM_BW = {"p4de": 1.6e12, "h100-ib": 2.6e12, "h200-ib": 3.8e12, "p5": 2.6e12}

# The baseline every strategy is compared with: xDiT's USP as deployed (Ulysses inside
# machines x Ring across, NCCL two-sided, text sharded, its ring loop's costs).
BASELINE_NAME = "xdit-usp"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class StepCost:
    """Constants of Note [Step cost]; ``attention`` is the simulator's cost model."""

    gemm_eff: float = 0.9  # fitted (docs/simulator.md)
    gemm_half: int = 64
    hidden_passes: float = 12.0
    ffn_passes: float = 2.0
    block_overhead: float = 20e-6  # fitted
    mem_bw: float | None = None  # None: the preset's (_MEM_BW) or attention.mem_bw
    attention: CostModel = dataclasses.field(default_factory=CostModel)

    def __post_init__(self) -> None:
        if not 0 < self.gemm_eff <= 1:
            raise ValueError(f"StepCost.gemm_eff must be in (0, 1], got {self.gemm_eff!r}")
        for name in ("gemm_half", "hidden_passes", "ffn_passes", "block_overhead"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"StepCost.{name} must be >= 0, got {value!r}")
        if self.mem_bw is not None and not self.mem_bw > 0:
            raise ValueError(f"StepCost.mem_bw must be > 0 or None, got {self.mem_bw!r}")

    def memory_bw(self, topology: Topology) -> float:
        if self.mem_bw is not None:
            return self.mem_bw
        return _MEM_BW.get(topology.name, self.attention.mem_bw)


@dataclasses.dataclass(frozen=True, slots=True)
class StrategyStep:
    """One strategy's step. ``latency_s`` is the sum of the four terms (Note [Step cost]).

    Attributes:
        strategy: the name asked for ("auto" included); ``chosen``: what ran ("auto" -> the
            planner's pick).
        degrees: (Ulysses, Ring) degrees of the self-attention.
        latency_s: the step, seconds.
        attention_s: all self-attention layers (communication included, as simulated).
        compute_s: projections, MLPs, elementwise work and block overheads of this rank's
            shard of the sequence (what SP splits).
        replicated_s: work on the text tokens that every rank repeats.
        cross_attention_s: local cross-attention to the text (0 for joint-text models).
        attention_layer_s: one self-attention layer.
        uneven_heads: the heads do not divide evenly over the Ulysses degree (the executor
            runs it, rank 0 gets the larger head group).
        transport: "one-sided" or "two-sided"; ``text``: "sharded" or "replicated".
        layer_busy: one self-attention layer's busy seconds per resource ("compute",
            "intra", "inter"); ``layer_overheads``: the fixed part of each (kernel launches,
            per-message latency, handshakes, per-call protocol cost).
    """

    strategy: str
    chosen: str
    degrees: tuple[int, int]
    latency_s: float
    attention_s: float
    compute_s: float
    replicated_s: float
    cross_attention_s: float
    attention_layer_s: float
    uneven_heads: bool = False
    transport: str = "one-sided"
    text: str = "replicated"
    layer_busy: dict[str, float] = dataclasses.field(default_factory=dict)
    layer_overheads: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class StepResult:
    """Every strategy's step on one topology, and the lower bound.

    Attributes:
        model, topology, height, width, frames: what was simulated.
        tokens: image/video tokens; ``text_len``: text tokens.
        strategies: name -> :class:`StrategyStep`, or None where the strategy cannot split
            the heads on this topology (``unavailable`` holds the reason).
        bound_s: ``max(compute_bound_s, comm_bound_s)`` (see :func:`simulate_step`).
        text: the text layout costed: "sharded" (joint text split with the sequence) or
            "replicated" (on every rank; always for cross-attention text).
        baseline: xDiT's USP as deployed (:func:`xdit_baseline`), or None when its layout
            cannot split the heads here; every speedup is over it.
        auto_by_text: with ``text="auto"``, the planner's best step under each text layout
            it weighed (Note [Text layout choice]); empty otherwise.
    """

    model: str
    topology: Topology
    height: int
    width: int
    frames: int
    tokens: int
    text_len: int
    strategies: dict[str, StrategyStep | None]
    unavailable: dict[str, str]
    bound_s: float
    compute_bound_s: float
    comm_bound_s: float
    text: str = "replicated"
    baseline: StrategyStep | None = None
    auto_by_text: dict[str, float] = dataclasses.field(default_factory=dict)

    def speedup_over_usp(self, name: str) -> float | None:
        usp, mine = self.strategies.get(baseline_strategy()), self.strategies.get(name)
        if usp is None or mine is None:
            return None
        return usp.latency_s / mine.latency_s

    def speedup(self, name: str) -> float | None:
        """``baseline latency / latency of name`` (None where either cannot run)."""
        mine = self.strategies.get(name)
        if self.baseline is None or mine is None:
            return None
        return self.baseline.latency_s / mine.latency_s

    def to_json(self) -> dict[str, Any]:
        """``{"strategies": {name: {"latency_s", "degrees", ...} or null}, "bound_s", ...}``."""
        out: dict[str, Any] = {}
        for name, s in self.strategies.items():
            if s is None:
                out[name] = None
                continue
            out[name] = {
                "latency_s": s.latency_s,
                "degrees": list(s.degrees),
                "chosen": s.chosen,
                "transport": s.transport,
                "text": s.text,
                "speedup": self.speedup(name),
                "speedup_over_usp": self.speedup_over_usp(name),
                "attention_s": s.attention_s,
                "compute_s": s.compute_s,
                "replicated_s": s.replicated_s,
                "cross_attention_s": s.cross_attention_s,
                "uneven_heads": s.uneven_heads,
            }
        return {
            "model": self.model,
            "topology": {
                "preset": self.topology.name,
                "machines": self.topology.machines,
                "gpus_per_machine": self.topology.gpus_per_machine,
            },
            "height": self.height,
            "width": self.width,
            "frames": self.frames,
            "tokens": self.tokens,
            "text_len": self.text_len,
            "text": self.text,
            "auto_by_text": dict(self.auto_by_text),
            "baseline": None
            if self.baseline is None
            else {
                "name": BASELINE_NAME,
                "latency_s": self.baseline.latency_s,
                "degrees": list(self.baseline.degrees),
                "transport": self.baseline.transport,
                "text": self.baseline.text,
            },
            "strategies": out,
            "unavailable": dict(self.unavailable),
            "bound_s": self.bound_s,
            "compute_bound_s": self.compute_bound_s,
            "comm_bound_s": self.comm_bound_s,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class _Work:
    """The step's shapes on one topology (rank 0 holds the largest shard)."""

    cfg: DiTConfig
    topology: Topology
    batch: int
    itemsize: int
    dtype: torch.dtype
    seq_len: int  # tokens in the sharded sequence
    attn_text: int  # replicated joint text in the self-attention
    local_tokens: int  # this rank's share of seq_len
    local_text: int  # text tokens this rank computes the text weights on
    cross_text: int  # text tokens of the cross-attention
    text_sharded: bool


TEXT_CHOICES = ("auto", "replicated", "sharded")


def rows_text(cfg: DiTConfig, text: str) -> Literal["replicated", "sharded"]:
    """The layout the strategy rows are costed with for ``text``: "auto" is what
    ``sf_models.parallelize(..., text="auto")`` runs, sharded for every joint-text model
    (tests/models/test_registries.py keeps the two in step), replicated cross-attention text.

    Raises:
        ValueError: ``text`` is not "auto", "replicated" or "sharded".
    """
    if text not in TEXT_CHOICES:
        raise ValueError(f"text must be one of {list(TEXT_CHOICES)}, got {text!r}")
    if text == "auto":
        return "sharded" if cfg.text_mode == "joint" else "replicated"
    return "sharded" if text == "sharded" else "replicated"


def _make_work(
    cfg: DiTConfig, topology: Topology, tokens: int, *, text: str, batch: int, dtype: torch.dtype
) -> _Work:
    text = rows_text(cfg, text)
    world = topology.world_size
    sharded = text == "sharded" and cfg.text_mode == "joint"
    seq_len = tokens + (cfg.text_len if sharded else 0)
    return _Work(
        cfg=cfg,
        topology=topology,
        batch=batch,
        itemsize=torch.empty((), dtype=dtype).element_size(),
        dtype=dtype,
        seq_len=seq_len,
        attn_text=0 if sharded else cfg.joint_text_len,
        local_tokens=-(-seq_len // world),
        local_text=0 if sharded else cfg.text_len,
        cross_text=cfg.text_len if cfg.text_mode == "cross" else 0,
        text_sharded=sharded,
    )


@functools.lru_cache(maxsize=4096)
def _attention_layer(
    strategy: str,
    topology: Topology,
    seq_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    batch: int,
    text_len: int,
    one_sided: bool,
    degree: int | None,
    cost: CostModel,
    ring_mode: tuple[str, float],
) -> tuple[float, tuple[int, int], dict[str, float], dict[str, float]]:
    """One layer's (latency, degrees, busy per resource, overheads per resource).

    ``ring_mode`` is :func:`sf_attn.hybrid.gather_setting` (whether rings gather their KV,
    Note [Gathered ring]), a part of the cache key; ``("never", 0.0)`` costs rings that
    never gather whatever the environment says (xDiT's)."""
    from ..hybrid import rotating_rings

    with rotating_rings() if ring_mode[0] == "never" else contextlib.nullcontext():
        r = simulate(
            strategy,
            topology,
            seq_len=seq_len,
            heads=heads,
            head_dim=head_dim,
            dtype=dtype,
            batch=batch,
            text_len=text_len,
            one_sided=one_sided,
            ulysses_degree=degree,
            cost=cost,
        )
    return r.latency_s, r.degrees, dict(r.breakdown), dict(r.overheads)


def _tile(n: int, half: float) -> float:
    return n / (n + half) if n > 0 else 1.0


def _gemm_s(tokens: int, weights: int, w: _Work, cost: StepCost) -> float:
    if tokens == 0 or weights == 0:
        return 0.0
    rate = w.topology.device_flops * cost.gemm_eff * _tile(tokens, cost.gemm_half)
    return 2.0 * w.batch * tokens * weights / rate


def _elementwise_s(tokens: int, w: _Work, cost: StepCost) -> float:
    per_token = (cost.hidden_passes * w.cfg.hidden + cost.ffn_passes * w.cfg.ffn) * w.itemsize
    return w.batch * tokens * per_token / cost.memory_bw(w.topology)


def _cross_s(w: _Work, cost: StepCost) -> float:
    if w.cross_text == 0:
        return 0.0
    c = cost.attention
    flops = 4.0 * w.batch * w.local_tokens * w.cross_text * w.cfg.hidden
    eff = _tile(w.local_tokens, c.block_half) * _tile(w.cross_text, c.block_half)
    return c.attn_overhead + flops / (kernel_rate(w.topology, w.cfg.head_dim, c.kernel) * eff)


def _strategy_step(
    name: str,
    w: _Work,
    *,
    chosen: str,
    degree: int | None,
    one_sided: bool,
    cost: StepCost,
    rotating: bool = False,
) -> StrategyStep:
    from ..hybrid import gather_setting

    cfg = w.cfg
    mode, budget = ("never", 0.0) if rotating else gather_setting()
    layer_s, degrees, busy, overheads = _attention_layer(
        chosen,
        w.topology,
        w.seq_len,
        cfg.heads,
        cfg.head_dim,
        w.dtype,
        w.batch,
        w.attn_text,
        one_sided,
        degree,
        cost.attention,
        (mode, budget if mode == "auto" else 0.0),
    )
    # rank 0 holds the largest shard; with sharded text, ~text/P of it are text tokens
    text_share = -(-cfg.text_len // w.topology.world_size) if w.text_sharded else 0
    image_local = w.local_tokens - text_share
    attention = compute = replicated = cross = 0.0
    for block in cfg.blocks:
        if block.self_attention:
            attention += block.count * layer_s
        compute += block.count * (
            _gemm_s(image_local, block.image_weights, w, cost)
            + _gemm_s(text_share, block.text_weights, w, cost)
            + _elementwise_s(w.local_tokens, w, cost)
            + cost.block_overhead
        )
        text_elem = _elementwise_s(w.local_text, w, cost) if cfg.text_mode == "joint" else 0.0
        replicated += block.count * (_gemm_s(w.local_text, block.text_weights, w, cost) + text_elem)
        if block.cross_attention:
            cross += block.count * _cross_s(w, cost)
    return StrategyStep(
        strategy=name,
        chosen=chosen,
        degrees=degrees,
        latency_s=attention + compute + replicated + cross,
        attention_s=attention,
        compute_s=compute,
        replicated_s=replicated,
        cross_attention_s=cross,
        attention_layer_s=layer_s,
        uneven_heads=cfg.heads % degrees[0] != 0,
        transport="one-sided" if one_sided else "two-sided",
        text="sharded" if w.text_sharded else "replicated",
        layer_busy=busy,
        layer_overheads=overheads,
    )


def _bounds(w: _Work, cost: StepCost) -> tuple[float, float]:
    """(compute / P, unavoidable communication): see :func:`simulate_step`."""
    cfg, topo = w.cfg, w.topology
    world, gpus = topo.world_size, topo.gpus_per_machine
    n_img = w.seq_len - (cfg.text_len if w.text_sharded else 0)
    text = cfg.text_len
    seq = w.seq_len + w.attn_text  # every token of the self-attention
    # the best large-message rate any transport reaches on each link (no per-call costs)
    links = topo.links
    inter_e = max(
        links.inter_all_to_all.e_max, links.inter_send_recv.e_max, links.inter_one_sided.e_max
    )
    inter_bw = topo.peak("inter") * inter_e
    intra_bw = topo.peak("intra") * max(links.intra_two_sided.e_max, links.intra_one_sided.e_max)
    attn_rate = kernel_rate(topo, cfg.head_dim, cost.attention.kernel)
    compute = comm = 0.0
    for block in cfg.blocks:
        flops = 2.0 * w.batch * (n_img * block.image_weights + text * block.text_weights)
        one = flops / (topo.device_flops * cost.gemm_eff)
        one += _elementwise_s(n_img + (text if cfg.text_mode == "joint" else 0), w, cost)
        if block.self_attention:
            one += 4.0 * w.batch * seq * seq * cfg.hidden / attn_rate
            # head scatter over all ranks: 3/4 of the bytes are q, k, v out, 1/4 the output back
            local_bytes = 4.0 * w.batch * (w.seq_len / world) * cfg.hidden * w.itemsize
            inter = local_bytes * (world - gpus) / world / inter_bw
            intra = local_bytes * (gpus - 1) / world / intra_bw
            comm += block.count * max(inter, intra)
        if block.cross_attention:
            one += 4.0 * w.batch * n_img * w.cross_text * cfg.hidden / attn_rate
        compute += block.count * one
    return compute / world, comm


def simulate_step(
    model: str | DiTConfig,
    topology: Topology,
    *,
    height: int,
    width: int,
    frames: int = 1,
    strategy: str | Sequence[str] | None = None,
    one_sided: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    text: Literal["auto", "replicated", "sharded"] = "replicated",
    cost: StepCost | None = None,
) -> StepResult:
    """Per-step latency of ``model`` at ``height`` x ``width`` (x ``frames``) on ``topology``.

    Args:
        model: a :mod:`sf_attn.sim.models` name ("flux", "sd3", "cogvideox",
            "hunyuanvideo", "wan") or a :class:`DiTConfig`.
        topology: e.g. ``Topology.preset("p4de", machines=4)``.
        height, width, frames: the output size in pixels (frames: 1 for image models).
        strategy: one name, several, or None for every registered strategy and "auto".
        one_sided: cost the transfers as one-sided puts (False: two-sided send/recv).
        dtype, batch: activations' dtype and the samples per step.
        text: "replicated" (the joint text tokens are on every rank and every rank computes
            them) or "sharded" (the text joins the sharded sequence: sf_models' default for
            the joint-text models, and xDiT's Flux layout used for the calibration).
            Cross-attention text (Wan) is replicated either way. "auto": the strategy rows
            are costed as ``sf_models.parallelize(..., text="auto")`` runs the model
            (:func:`rows_text`) and ``auto`` chooses the layout too, where both are exact
            (joint text; Note [Text layout choice]).
        cost: Note [Step cost] constants (default: the calibrated :class:`StepCost`).

    Returns:
        A :class:`StepResult`. ``bound_s = max(compute_bound_s, comm_bound_s)``:

        - ``compute_bound_s``: the whole step's compute on one device (attention FLOPs at
          the kernel's rate for the head_dim (Note [Kernel rates]) with no small-block loss,
          GEMMs at ``device_flops * gemm_eff``, elementwise bytes at full memory bandwidth,
          no per-kernel overheads; text tokens counted once) divided by P.
        - ``comm_bound_s`` (the unavoidable communication): per self-attention layer, the
          bytes of a head scatter over all P ranks (each rank sends (P-1)/P of its q, k, v and
          of the output rows it computed for others: ``4 (P-1)/P * N/P * hidden`` elements),
          of which the share addressed to other machines crosses the NICs at
          ``inter_bw / gpus_per_nic`` per GPU and the rest NVLink at ``intra_bw``, each times
          the best large-message efficiency ``e_max`` of any transport on it; the slower of
          the two, with no latency, no per-call cost, no handshakes and perfect overlap. No
          strategy here moves fewer inter-machine bytes (Ring/USP move more once there are
          more than two machines; TAS/Torus move the same), and with two machines it equals
          the pairwise minimum (every cross-machine query/key pair needs k, v or q, o to
          cross).

    Raises:
        ValueError: unknown model or strategy, or a size/frame count the model cannot make.
    """

    cfg = get_model(model) if isinstance(model, str) else model
    cost = cost or StepCost()
    tokens = cfg.tokens(height, width, frames)
    if strategy is None:
        names: list[str] = strategy_names()
    elif isinstance(strategy, str):
        names = [strategy]
    else:
        names = list(strategy)
    w = _make_work(cfg, topology, tokens, text=text, batch=batch, dtype=dtype)
    baseline = xdit_baseline(cfg, topology, tokens=tokens, batch=batch, dtype=dtype)
    results: dict[str, StrategyStep | None] = {}
    unavailable: dict[str, str] = {}
    by_text: dict[str, float] = {}
    for name in names:
        if name == "auto":
            layouts = [w]
            if text == "auto" and cfg.text_mode == "joint":
                layouts.append(
                    _make_work(cfg, topology, tokens, text="replicated", batch=batch, dtype=dtype)
                )
            picks = [_planned_step(lw, one_sided=one_sided, cost=cost) for lw in layouts]
            if len(picks) > 1:
                by_text = {p.text: p.latency_s for p in picks}
            best = min(picks, key=lambda p: p.latency_s)
            results[name] = _auto_step(best, w, baseline, cost=cost)
            continue
        get_strategy(name)  # an unknown name is an error, not "n/a"
        try:
            results[name] = _strategy_step(
                name, w, chosen=name, degree=None, one_sided=one_sided, cost=cost
            )
        except ValueError as err:  # the layout cannot split the heads on this topology
            results[name] = None
            unavailable[name] = str(err)
    compute_bound, comm_bound = _bounds(w, cost)
    return StepResult(
        model=cfg.name,
        topology=topology,
        height=height,
        width=width,
        frames=frames,
        tokens=tokens,
        text_len=cfg.text_len,
        strategies=results,
        unavailable=unavailable,
        bound_s=max(compute_bound, comm_bound),
        compute_bound_s=compute_bound,
        comm_bound_s=comm_bound,
        text="sharded" if w.text_sharded else "replicated",
        baseline=baseline,
        auto_by_text=by_text,
    )


def step_terms(
    model: str | DiTConfig, step: StrategyStep, cost: StepCost | None = None
) -> dict[str, float]:
    """Seconds of one step per kind of work, for saying which term dominates (``--explain``).

    ``"inter"`` / ``"intra"``: the self-attention layers' transfers on each link at the
    link's rate (busy time, overlapped or not); ``"compute"``: attention kernels and merges
    at their rates plus the step's GEMMs and elementwise work; ``"overheads"``: the fixed
    costs (kernel launches and merges' fixed part, per-message latency, handshakes, the
    links' per-call cost, the per-block overhead). Busy times may overlap, so the terms can
    add up to more than the step.
    """
    cfg = get_model(model) if isinstance(model, str) else model
    cost = cost or StepCost()
    layers = sum(b.count for b in cfg.blocks if b.self_attention)
    blocks = sum(b.count for b in cfg.blocks)
    busy, fixed = step.layer_busy, step.layer_overheads

    def net(track: str) -> float:
        return layers * (busy.get(track, 0.0) - fixed.get(track, 0.0))

    non_attention = step.compute_s + step.replicated_s + step.cross_attention_s
    return {
        "inter": net("inter"),
        "intra": net("intra"),
        "compute": net("compute") + non_attention - blocks * cost.block_overhead,
        "overheads": layers * sum(fixed.values()) + blocks * cost.block_overhead,
    }


# Fitted (with StepCost.gemm_eff, block_overhead and CostModel.handshake) to the four rows
# marked fitted in sf_attn.sim.calibration; see docs/simulator.md. Refitted (2026-11-30) when the executed ring
# stopped merging its first block (as xDiT's does not either): the per-block and per-merge
# costs are then told apart, and the data put all of xDiT's fixed cost on the block (its
# merge keeps the memory pass at XDIT_MERGE_BW).
XDIT_BLOCK_OVERHEAD_S = 100e-6  # per attention block (CostModel.attn_overhead)
XDIT_MERGE_OVERHEAD_S = 0.0  # per merge (CostModel.merge_overhead)
XDIT_MERGE_BW = 1.0e12  # bytes/s of the unfused float32 merge (CostModel.mem_bw)


def xdit_cost() -> StepCost:
    """:class:`StepCost` for xDiT's implementation: the defaults plus its ring loop's overheads.

    xDiT's ring attention (yunchang) runs each ring step from Python: a flash-attention call
    with its own log-sum-exp bookkeeping, then an unfused float32 merge (several elementwise
    kernels where StreamFusion's merge is one). Those per-block and per-merge costs were
    fitted to the published numbers (Note [Step cost], docs/simulator.md); everything else is
    the default (shared) constants.
    """
    base = StepCost()
    xdit_attention = dataclasses.replace(
        base.attention,
        attn_overhead=XDIT_BLOCK_OVERHEAD_S,
        merge_overhead=XDIT_MERGE_OVERHEAD_S,
        mem_bw=XDIT_MERGE_BW,
    )
    return dataclasses.replace(base, attention=xdit_attention)


def xdit_baseline(
    model: str | DiTConfig,
    topology: Topology,
    *,
    tokens: int,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> StrategyStep | None:
    """xDiT's USP as deployed: the step every speedup is measured against.

    Ulysses inside machines x Ring across them at USP's default degrees (the largest
    Ulysses degree a machine holds that splits the heads), NCCL two-sided transfers, the
    joint text sharded with the image tokens (xDiT's layout), rings that rotate and never
    gather, and xDiT's ring loop costs (:func:`sf_attn.sim.calibration.xdit_cost`, fitted to
    its published figures). None when USP cannot split the heads on ``topology``.
    """
    cfg = get_model(model) if isinstance(model, str) else model
    w = _make_work(cfg, topology, tokens, text="sharded", batch=batch, dtype=dtype)
    try:
        return _strategy_step(
            BASELINE_NAME,
            w,
            chosen=baseline_strategy(),
            degree=None,
            one_sided=False,
            cost=xdit_cost(),
            rotating=True,
        )
    except ValueError:
        return None


# Note [Text layout choice]
# A joint-text model runs exactly under either text layout (Note [Text layouts] in
# sf_models.plan), and the two trade compute for communication: sharded text splits the
# text stream's projections and MLPs over the ranks but adds the text tokens to every
# collective of the attention; replicated text repeats that stream on every rank and keeps
# its q, k, v local (only its output rows are merged). With simulate_step(text="auto"),
# ``auto`` runs the planner under both layouts, costs each pick's whole step and keeps the
# shorter (ties go to sharded, the layout parallelize runs by default); the strategy rows
# stay at the default layout so that they compare with the baseline as the models run.
# Cross-attention text (Wan) has one layout.


def _planned_step(w: _Work, *, one_sided: bool, cost: StepCost) -> StrategyStep:
    """The planner's pick for ``w``'s attention layer and text layout, as a whole step."""
    from ..planner import plan_for

    cfg = w.cfg
    plan = plan_for(
        w.topology,
        seq_len=w.seq_len,
        heads=cfg.heads,
        head_dim=cfg.head_dim,
        dtype=w.dtype,
        batch=w.batch,
        text_len=w.attn_text,
        one_sided=one_sided,
    )
    return _strategy_step(
        "auto", w, chosen=plan.strategy, degree=plan.ulysses_degree, one_sided=one_sided, cost=cost
    )


def _auto_step(
    pick: StrategyStep, w: _Work, baseline: StrategyStep | None, *, cost: StepCost
) -> StrategyStep:
    """The planner's ``pick``, or the baseline's configuration run by StreamFusion where that
    is shorter: never slower than the baseline by the model.

    Note [Auto against the baseline]: the planner ranks one attention layer (every strategy
    shards the rest of the step alike) with the transport asked for. Its pick is then
    compared with the baseline's own configuration run by StreamFusion (USP at xDiT's
    degrees, two-sided, text sharded, rotating rings): StreamFusion can always run that,
    so ``auto`` takes whichever step is shorter. The rest of the step differs only by the
    text layout, which is why the comparison is of whole steps.
    """
    cfg = w.cfg
    if baseline is None or pick.latency_s <= baseline.latency_s:
        return pick
    sharded = _make_work(
        cfg,
        w.topology,
        w.seq_len - (cfg.text_len if w.text_sharded else 0),
        text="sharded",
        batch=w.batch,
        dtype=w.dtype,
    )
    as_xdit = _strategy_step(
        "auto",
        sharded,
        chosen=baseline.chosen,
        degree=baseline.degrees[0],
        one_sided=False,
        cost=cost,
        rotating=True,
    )
    return as_xdit if as_xdit.latency_s < pick.latency_s else pick


def step_latency(
    model: str | DiTConfig,
    topology: Topology,
    *,
    height: int,
    width: int,
    frames: int = 1,
    strategy: str,
    ulysses_degree: int | None = None,
    one_sided: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    text: Literal["replicated", "sharded"] = "replicated",
    cost: StepCost | None = None,
) -> StrategyStep:
    """One strategy's step at a given Ulysses degree (``simulate_step`` uses the defaults).

    Raises:
        ValueError: as :func:`sf_attn.sim.layer.simulate` (degree or heads the strategy cannot split).
    """
    cfg = get_model(model) if isinstance(model, str) else model
    w = _make_work(
        cfg, topology, cfg.tokens(height, width, frames), text=text, batch=batch, dtype=dtype
    )
    return _strategy_step(
        strategy,
        w,
        chosen=strategy,
        degree=ulysses_degree,
        one_sided=one_sided,
        cost=cost or StepCost(),
    )


__all__ = [
    "BASELINE_NAME",
    "StepCost",
    "StepResult",
    "StrategyStep",
    "rows_text",
    "simulate_step",
    "step_latency",
    "step_terms",
    "xdit_baseline",
]
