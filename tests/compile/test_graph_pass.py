"""Tier 1: the sequence-splitting FX pass (``sf_compile.shard_graph``) on hand-built graphs.

No devices and no process group: graphs are built with ``fx.symbolic_trace`` (torch-level ops,
as Dynamo hands them over) or by hand with aten ops, rewritten for one rank of a simulated
split, and inspected by node counts and by the pass's report.

Numerics without communication: every propagation case ends in *cross*-attention to
replicated keys/values, which the pass keeps local (no ``streamfusion::attention``), so the
only communication left is the gather of the graph output. That gather is replaced by one that
records this rank's part; concatenating the parts of every rank must give the eager output.
Tolerance: the rewritten graph runs the same float32 ops on fewer rows; matmul/SDPA blocking
may differ with the row count (~1e-7 relative), so 1e-5 absolute on unit-scale outputs, while
a wrong slice, a misplaced row or a dropped token moves outputs by ~1e-1.
"""

from __future__ import annotations

import collections
import operator
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import sf_attn
import sf_comm
from sf_compile import Shard, ShardReport, Split, UnsupportedOpError, shard_graph
from sf_compile.ops import register_context
from sf_compile.rules import map_view

B, S, C, HEADS, TEXT = 2, 7, 8, 2, 3
CTX_KEY = register_context(object())  # type: ignore[arg-type]  # never used to communicate
GATHER = torch.ops.streamfusion.gather.default
ATTENTION = torch.ops.streamfusion.attention.default
TOL = 1e-5  # see the module docstring


def _targets(gm: fx.GraphModule) -> collections.Counter[Any]:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _rewrite(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], rank: int = 0, world: int = 3, **kw: Any
) -> tuple[fx.GraphModule, ShardReport]:
    return shard_graph(gm, split=Split(rank, world), ctx_key=CTX_KEY, example_inputs=inputs, **kw)


@pytest.fixture
def record_gather(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.Tensor]]:
    """Make ``streamfusion::gather`` record this rank's part and return zeros."""
    parts: list[torch.Tensor] = []

    def fake_gather(
        x: torch.Tensor, ctx: Any, dim: int = 1, length: int | None = None
    ) -> torch.Tensor:
        parts.append(x.clone())
        shape = list(x.shape)
        shape[dim] = length if length is not None else shape[dim]
        return x.new_zeros(shape)

    monkeypatch.setattr(sf_attn, "gather", fake_gather)
    yield parts


def _assert_ranks_match_eager(
    gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], parts: list[torch.Tensor], world: int = 3
) -> None:
    ref = gm(*inputs)
    if isinstance(ref, tuple):  # Dynamo's graphs return a tuple
        (ref,) = ref
    pieces = []
    for rank in range(world):
        new, _ = _rewrite(gm, inputs, rank, world)
        parts.clear()
        new(*inputs)
        assert len(parts) == 1, f"rank {rank}: expected only the output gather, got {len(parts)}"
        pieces.append(parts[0])
    assert [p.shape[1] for p in pieces] == sf_attn.chunk_sizes(S, world)
    torch.testing.assert_close(torch.cat(pieces, dim=1), ref, atol=TOL, rtol=TOL)


# -- propagation through each supported op ------------------------------------------------


class Case(nn.Module):
    """``op(x)`` -> queries of a cross-attention to replicated text -> [B, S, C]."""

    def __init__(self, op: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.op = op
        self.weight = nn.Parameter(torch.randn(C, C) / C**0.5)
        self.pos = nn.Parameter(torch.randn(1, S, C))

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.op(self, x, t)
        q = h.view(B, S, HEADS, C // HEADS).transpose(1, 2)
        kv = text.view(B, TEXT, HEADS, C // HEADS).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv, kv)
        return out.transpose(1, 2).reshape(B, S, C)


def _chunk_split(x: torch.Tensor) -> torch.Tensor:
    halves, quarters = x.chunk(2, dim=-1), x.split([2, 6], -1)
    return torch.cat([halves[1], halves[0]], -1) + torch.cat([quarters[1], quarters[0]], -1)


def _stack_unbind(x: torch.Tensor) -> torch.Tensor:
    pieces = torch.stack([x, x * 2], 0).unbind(0)
    return pieces[0] - pieces[1]


OPS: dict[str, Callable[[Case, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": lambda m, x, t: F.linear(x, m.weight),
    "layer_norm": lambda m, x, t: F.layer_norm(x, (C,)),
    "rms_norm": lambda m, x, t: F.rms_norm(x, (C,)),
    "activations": lambda m, x, t: F.silu(F.gelu(x)).tanh(),
    "pos_embed_add": lambda m, x, t: x + m.pos,
    "timestep_broadcast": lambda m, x, t: x * (1 + t[:, None, :]) + t.unsqueeze(1),
    "view_reshape": lambda m, x, t: x.view(B, S, 2, C // 2).reshape(B, S, C),
    "permute_transpose": lambda m, x, t: x.permute(0, 2, 1).transpose(1, 2),
    "unsqueeze_squeeze": lambda m, x, t: x.unsqueeze(0).squeeze(0),
    "flatten_unflatten": lambda m, x, t: x.unflatten(-1, (2, C // 2)).flatten(2),
    "index_channels": lambda m, x, t: torch.cat([x[..., C // 2 :], x[:, :, : C // 2]], dim=-1),
    "chunk_split": lambda m, x, t: _chunk_split(x),
    "stack_unbind": lambda m, x, t: _stack_unbind(x),
    "softmax_channels": lambda m, x, t: x.softmax(-1),
    "mean_channels": lambda m, x, t: x - x.mean(-1, keepdim=True),
    "expand": lambda m, x, t: x[:, :, :1].expand(B, S, C) + x,
    "casts": lambda m, x, t: x.double().float().type_as(x).to(torch.float32),
    "matmul": lambda m, x, t: x @ m.weight,
    "where": lambda m, x, t: torch.where(x > 0, x, -x),
}


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(B, S, C, generator=g),
        torch.randn(B, C, generator=g),
        torch.randn(B, TEXT, C, generator=g),
    )


@pytest.mark.parametrize("name", list(OPS))
def test_tokens_propagate_through_op(name: str, record_gather: list[torch.Tensor]) -> None:
    """Catches a rule that loses the token dim through a supported op (it would gather,
    i.e. fall back to whole-sequence work, or split the wrong dim and give wrong rows), a
    size argument left at the full length, a positional embedding not sliced or a timestep
    vector sliced. Every rank's rows, concatenated, must equal the eager output."""
    case, inputs = Case(OPS[name]), _inputs()
    gm = fx.symbolic_trace(case)
    new, report = _rewrite(gm, inputs)
    seeded = {entry.split(":")[0] for entry in report.inputs}
    assert "x" in seeded, report.summary()  # tokens traced back to the input
    assert ("pos" in seeded) == (name == "pos_embed_add"), report.summary()
    assert "t" not in seeded, report.summary()  # per-sample vector: broadcast, never split
    assert [g.split(": ")[1] for g in report.gathered] == ["graph output"], report.summary()
    assert not report.fallbacks and not report.sliced, report.summary()
    assert report.attention == ["scaled_dot_product_attention: local (keys/values whole)"]
    counts = _targets(new)
    assert counts[GATHER] == 1 and counts[ATTENTION] == 0
    _assert_ranks_match_eager(gm, inputs, record_gather)


def _rope_in_place(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)  # Wan's RoPE writes even/odd channels into a fresh tensor
    out[..., 0::2] = x[..., 0::2] * t[:, None, 0::2] - x[..., 1::2]
    out[..., 1::2] = x[..., 1::2] * t[:, None, 1::2] + x[..., 0::2]
    q = out.view(B, S, HEADS, C // HEADS).transpose(1, 2)
    kv = text.view(B, TEXT, HEADS, C // HEADS).transpose(1, 2)
    return F.scaled_dot_product_attention(q, kv, kv).transpose(1, 2).reshape(B, S, C)


def test_in_place_writes_keep_tokens_split(record_gather: list[torch.Tensor]) -> None:
    """Catches in-place writes (``out[..., ::2] = y``, which Dynamo records as ``setitem``
    with no output) being lost: the write must land in the version of ``out`` later ops read
    (Note [In-place ops]), and the written values must be followed back to the input."""
    captured: list[fx.GraphModule] = []

    def capture(gm: fx.GraphModule, example_inputs: Any) -> Any:
        captured.append(gm)
        return gm

    torch._dynamo.reset()
    inputs = _inputs()
    torch.compile(_rope_in_place, backend=capture, fullgraph=True, dynamic=False)(*inputs)
    gm = captured[0]
    assert sum(n.target is operator.setitem for n in gm.graph.nodes) == 2
    _, report = _rewrite(gm, inputs)
    assert report.inputs == ["l_x_: tokens on dim 1 (7)"], report.summary()
    assert [g.split(": ")[1] for g in report.gathered] == ["graph output"], report.summary()
    _assert_ranks_match_eager(gm, inputs, record_gather)


def test_view_sizes_are_rewritten_to_local() -> None:
    """Catches ``view(B, S, ...)`` keeping the full token count (a shape error at run time, or
    worse a silent reinterpretation when sizes happen to divide)."""
    gm = fx.symbolic_trace(Case(OPS["view_reshape"]))
    new, _ = _rewrite(gm, _inputs(), rank=2, world=3)  # 7 tokens over 3 ranks: 3, 2, 2
    views = [
        n for n in new.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape")
    ]
    first = views[0]
    assert first.args[1:] == (B, 2, 2, C // 2), first.args
    narrow = next(n for n in new.graph.nodes if n.target is torch.narrow)
    assert narrow.args[1:] == (1, 5, 2)  # rank 2 holds tokens 5..6


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "dim", "expected"),
    [
        ((2, 7, 8), (2, 7, 2, 4), 1, 1),
        ((2, 7, 8), (2, 1, 7, 8), 1, 2),
        ((2, 7, 2, 4), (2, 7, 8), 1, 1),
        ((2, 7, 8), (14, 8), 1, None),  # merged with the batch
        ((2, 7, 8), (2, 56), 1, None),  # merged with the channels
        ((2, 5, 7, 4), (2, 35, 4), 1, None),  # patch grid merged into tokens
    ],
)
def test_map_view(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], dim: int, expected: int | None
) -> None:
    """Catches a reshape rule that claims the token dim survives a merge (rows of different
    tokens would be cut apart) or misses that it survives (needless gathers)."""
    assert map_view(in_shape, out_shape, dim) == expected


# -- what is left alone ------------------------------------------------------------------


def test_graph_without_attention_is_unchanged() -> None:
    """Catches the pass splitting or gathering anything in a graph with no attention: there
    are no tokens to split, so the rewritten graph must run the same ops on the same args."""

    def mlp(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.linear(x, w)).mean(dim=1)

    gm = fx.symbolic_trace(mlp)
    inputs = (torch.randn(B, S, C), torch.randn(C, C))
    new, report = _rewrite(gm, inputs)

    def ops(g: fx.GraphModule) -> list[tuple[str, Any, str, str]]:
        return [(n.op, n.target, str(n.args), str(n.kwargs)) for n in g.graph.nodes]

    assert ops(new) == ops(gm)
    assert not (report.inputs or report.sliced or report.gathered or report.attention)
    torch.testing.assert_close(new(*inputs), gm(*inputs), rtol=0, atol=0)


# -- node counts on a DiT-like graph -------------------------------------------------------


class SelfAttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(C, 3 * C)
        self.out = nn.Linear(C, C)
        self.pos = nn.Parameter(torch.randn(1, S, C))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.pos
        for _ in range(2):
            q, k, v = self.qkv(x).view(B, S, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q, k, v)
            x = x + self.out(a.transpose(1, 2).reshape(B, S, C))
        return x, x.mean(dim=1)


def test_self_attention_graph_node_counts() -> None:
    """Catches attention left as whole-sequence SDPA, extra gathers between layers (each is
    communication the model does not need), a pooled output computed on one rank's tokens
    only (``mean`` over tokens must see all of them: a gather before it) and the same value
    gathered twice (the token output reuses the mean's gather)."""
    gm = fx.symbolic_trace(SelfAttentionBlock())
    new, report = _rewrite(gm, (torch.randn(B, S, C),))
    counts = _targets(new)
    assert counts[ATTENTION] == 2
    assert counts[F.scaled_dot_product_attention] == 0
    assert counts[GATHER] == 1  # x, for the mean and the token output
    assert counts[torch.narrow] == 2  # x and the positional embedding, where they enter
    assert report.gathered == ["mean: mean over the token dim needs all tokens"]
    attn = [n for n in new.graph.nodes if n.target is ATTENTION]
    assert attn[0].args[3:6] == (S, 0, None)  # full length, no text prefix, default scale


def test_joint_text_prefix() -> None:
    """Catches MMDiT joint attention treated as plain attention over the concatenated stream
    (text tokens would be split across ranks, or image tokens gathered): ``cat([text, x])``
    must give a layout with a replicated text prefix, attention gets it as joint text, and
    ``split_with_sizes`` / slicing at the boundary return whole text and split image parts."""

    def joint(x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([text, x], dim=1)  # [B, TEXT + S, C]
        q = h.view(B, TEXT + S, HEADS, C // HEADS).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).flatten(2)
        t_out, x_out = o.split_with_sizes([TEXT, S], dim=1)
        return t_out * 2, x_out + o[:, TEXT:]

    gm = fx.symbolic_trace(joint)
    new, report = _rewrite(gm, (torch.randn(B, S, C), torch.randn(B, TEXT, C)), rank=1, world=2)
    attn = next(n for n in new.graph.nodes if n.target is ATTENTION)
    assert attn.args[3:5] == (TEXT + S, TEXT), attn.args  # length, replicated text prefix
    split = next(n for n in new.graph.nodes if n.target == "split_with_sizes")
    assert split.args[1] == [TEXT, 3]  # rank 1 of 2 holds 3 of the 7 image tokens
    assert report.gathered == ["add: graph output"], report.summary()  # text output: whole
    assert report.inputs == ["x: tokens on dim 1 (7)"]


# -- fallback and error ----------------------------------------------------------------------


def _flip_model(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    kv = text.view(B, TEXT, HEADS, C // HEADS).transpose(1, 2)
    q = x.view(B, S, HEADS, C // HEADS).transpose(1, 2)
    h = F.scaled_dot_product_attention(q, kv, kv)  # local: split along the tokens
    h = torch.flip(h, dims=[3])  # no rule for flip: gathered first
    return F.scaled_dot_product_attention(h, kv, kv)  # re-split (a free slice)


def test_unknown_op_falls_back_to_gather() -> None:
    """Catches an unknown op run on this rank's tokens as if it were elementwise (wrong for
    any op that mixes tokens): Note [Gather fallback] gathers its input first, runs it whole,
    reports it, and re-slices for the attention that follows."""
    gm = fx.symbolic_trace(_flip_model)
    new, report = _rewrite(gm, (torch.randn(B, S, C), torch.randn(B, TEXT, C)))
    assert report.fallbacks == ["flip: no rule for flip"], report.summary()
    assert report.sliced == ["scaled_dot_product_attention_1: input cut to tokens on dim 2 (7)"]
    assert _targets(new)[GATHER] == 2  # flip's input, the output
    flip = next(n for n in new.graph.nodes if n.target is torch.flip)
    assert flip.args[0].target is GATHER


def test_unknown_op_error_names_node() -> None:
    """Catches ``on_unsupported="error"`` silently gathering (users who ask for an error want
    to know which op costs them the split) or failing without naming the node."""
    gm = fx.symbolic_trace(_flip_model)
    inputs = (torch.randn(B, S, C), torch.randn(B, TEXT, C))
    with pytest.raises(UnsupportedOpError, match=r"node flip \(flip\).*no rule for flip"):
        _rewrite(gm, inputs, on_unsupported="error")


def test_reshape_mixing_tokens_gathers() -> None:
    """Catches a reshape that merges the token dim with the channels being run on local rows
    (it would interleave rows of different tokens): it must gather first, as documented."""

    def mix(x: torch.Tensor) -> torch.Tensor:
        q = x.view(B, S, HEADS, C // HEADS).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, q, q).transpose(1, 2)
        return o.reshape(B, S * C)

    _, report = _rewrite(fx.symbolic_trace(mix), (torch.randn(B, S, C),))
    assert report.gathered == ["reshape: reshape merges or splits the token dim"], report.summary()
    assert not report.fallbacks


# -- aten-level graphs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sdpa",
    [
        torch.ops.aten.scaled_dot_product_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    ],
)
def test_aten_attention_ops_are_replaced(sdpa: Any) -> None:
    """Catches attention in an aten-level graph (AOT / export) going unrecognised: the aten
    SDPA ops (including the CPU flash op that returns (out, logsumexp)) must become
    ``streamfusion::attention`` like ``F.scaled_dot_product_attention``."""
    graph = fx.Graph()
    q = graph.placeholder("q")
    out = graph.call_function(sdpa, (q, q, q))
    if sdpa is not torch.ops.aten.scaled_dot_product_attention.default:
        out = graph.call_function(operator.getitem, (out, 0))
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (out, 2.0)))
    gm = fx.GraphModule(nn.Module(), graph)
    new, report = _rewrite(gm, (torch.randn(B, HEADS, S, C),))
    counts = _targets(new)
    assert counts[ATTENTION] == 1 and counts[sdpa] == 0
    assert report.inputs == ["q: tokens on dim 2 (7)"]
    assert [g.split(": ")[1] for g in report.gathered] == ["graph output"]


def test_shard_layout_validation() -> None:
    """Catches layouts that cannot exist (negative dims, text prefix longer than the tokens)."""
    with pytest.raises(ValueError, match="prefix"):
        Shard(1, 4, prefix=5)
    with pytest.raises(ValueError, match="dim"):
        Shard(-1, 4)
    with pytest.raises(ValueError, match="rank"):
        Split(2, 2)
    assert Split(1, 3).local_len(Shard(1, 10, prefix=3)) == 3 + 2  # 7 split 3, 2, 2
    assert Split(1, 3).offset(Shard(1, 10, prefix=3)) == 3 + 3


# -- the overlap schedule ------------------------------------------------------------------


class _PlanningContext:
    """What the pass reads from a context at compile time (topology, transport kind)."""

    topology = sf_comm.Topology(machines=1, gpus_per_machine=2)
    transport = types.SimpleNamespace(one_sided=True)
    world_size = 2


PLANNING_KEY = register_context(_PlanningContext())  # type: ignore[arg-type]
SEND = torch.ops.streamfusion.ulysses_send.default
FINISH = torch.ops.streamfusion.attention_overlapped.default


def _separate_projections(
    x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor
) -> torch.Tensor:
    q = F.linear(x, wq).view(B, S, HEADS, C // HEADS).transpose(1, 2)
    k = F.rms_norm(F.linear(x, wk).view(B, S, HEADS, C // HEADS), (C // HEADS,)).transpose(1, 2)
    v = F.linear(x, wv).view(B, S, HEADS, C // HEADS).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_overlap_schedule_sends_value_first(strategy: str) -> None:
    """Catches the overlap schedule not overlapping: V's projection must move ahead of Q's and
    K's (written first in the model), V's exchange must start before Q is projected and Q/K's
    right after K's norm, all before the op that finishes the attention. A strategy with no
    Ulysses exchange (ring) must keep the plain op."""
    gm = fx.symbolic_trace(_separate_projections)
    inputs = (torch.randn(B, S, C), *(torch.randn(C, C) for _ in range(3)))
    new, report = shard_graph(
        gm,
        split=Split(0, 2),
        ctx_key=PLANNING_KEY,
        strategy=strategy,
        overlap=True,
        example_inputs=inputs,
    )
    counts = _targets(new)
    if strategy == "ring":
        assert counts[ATTENTION] == 1 and counts[SEND] == 0, report.summary()
        return
    assert counts[ATTENTION] == 0 and counts[SEND] == 2 and counts[FINISH] == 1
    assert "attention_overlapped (ulysses, Ulysses degree 2, V sent first)" in report.attention[0]
    order = [n for n in new.graph.nodes if n.op == "call_function"]
    linears = [n for n in order if n.target is F.linear]
    weights = [str(n.args[1]) for n in linears]
    assert weights == ["wv", "wq", "wk"], weights  # V's projection hoisted first
    sends = [n for n in order if n.target is SEND]
    assert [s.args[-1] for s in sends] == ["v", "qk"]
    position = {n: i for i, n in enumerate(new.graph.nodes)}
    assert position[sends[0]] < position[linears[1]]  # V sent before Q is projected
    norm = next(n for n in order if n.target is F.rms_norm)
    finish = next(n for n in order if n.target is FINISH)
    assert position[norm] < position[sends[1]] < position[finish]
