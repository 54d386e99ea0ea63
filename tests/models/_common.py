"""Shared pieces of the tier-2 model tests: run a parallelized model on CPU ranks against the
same model in one process, and count each rank's attention work.

The functions here run on the ranks (``ranks(world).run(fn, ...)``); the model and inputs are
built on every rank by module-level ``make_model(*args)`` / ``make_inputs(*args)`` functions of
the test module, from fixed seeds, so every rank holds the same weights and inputs.

Tolerance (``REL_TOL``): the models are float32 throughout. The only arithmetic that differs
from the reference is attention (SDPA over all keys vs sf_attn's blockwise online-softmax
merges, both float32), which agree to ~1e-6 relative per layer; through two attention layers
plus residuals the outputs stay within a few 1e-7 of the reference, relative to their largest
entry. 1e-4 leaves margin for summation-order noise, while a real bug (a RoPE row off by one
token, a dropped or duplicated token chunk, a text mask lost, a misrouted head) moves the
output by 1e-3 or more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import sf_attn
import sf_attn.hybrid
import sf_comm
from sf_models.parallelize import parallelize
from sf_models.plan import TextLayout

STRATEGIES = ["ulysses", "ring", "usp", "tas"]
WORLDS = [(2, "1x2"), (4, "2x2")]
REL_TOL = 1e-4  # see the module docstring

Builder = Callable[..., Any]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def same_on_every_rank(ctx: sf_comm.Context, t: torch.Tensor) -> bool:
    """Collective (every rank must call it): ``t`` is bit-identical on all ranks."""
    every = sf_comm.all_gather(ctx, ctx.group("world"), t.contiguous()).wait()
    return all(torch.equal(every[0], x) for x in every)


def error_messages(
    cases: Sequence[Callable[[], object]],
    catch: type[Exception] | tuple[type[Exception], ...] = ValueError,
) -> list[str]:
    """Run each case; the message of the ``catch`` error it raised, or ``"no error"``."""
    msgs = []
    for case in cases:
        try:
            case()
            msgs.append("no error")
        except catch as exc:
            msgs.append(str(exc))
    return msgs


@torch.no_grad()
def compare(
    ctx: sf_comm.Context,
    strategy: str,
    make_model: Builder,
    make_inputs: Builder,
    *args: Any,
    positional: bool = False,
    text: TextLayout = "auto",
    rows_of: str = "context_embedder",
) -> dict[str, object]:
    """Run the parallelized model (``parallelize(..., text=text)``) and the original on the
    same full inputs on this rank.

    The tuple path (``return_dict=False``) gets the inputs as keywords, or with ``positional``
    in ``make_inputs``' order as positional arguments (that order must be the forward's).
    ``text_rows`` in the result: the tokens the submodule ``rows_of`` (a per-token layer of
    the text stream) ran on in the parallel call; None where the model has no such module."""
    inputs = make_inputs(*args)
    model = make_model(*args)
    ref = model(**inputs).sample
    sp = parallelize(model, ctx=ctx, strategy=strategy, text=text)
    try:
        watched = model.get_submodule(rows_of)
    except AttributeError:
        watched = None
    embedded = _RowsSeen(watched)
    out = sp(**inputs).sample
    embedded.remove()
    if positional:
        (out_tuple,) = sp(*inputs.values(), return_dict=False)
    else:
        (out_tuple,) = sp(**inputs, return_dict=False)
    return dict(
        rel_err=rel_err(out, ref),
        shape_ok=out.shape == ref.shape,
        same_on_every_rank=same_on_every_rank(ctx, out),
        tuple_path_equal=torch.equal(out_tuple, out),
        # The processors and hooks stay installed; outside the wrapper they must be inert.
        direct_call_unchanged=torch.equal(model(**inputs).sample, ref),
        text_layout=sp.state.text,
        # text tokens this rank's ``rows_of`` ran on (None: the model has none)
        text_rows=embedded.rows,
    )


class _RowsSeen:
    """Counts the tokens (dim 1 of the input) ``module`` runs on until ``remove()``."""

    def __init__(self, module: torch.nn.Module | None) -> None:
        self.rows: int | None = None
        self.handle = None if module is None else module.register_forward_hook(self._seen)

    def _seen(self, _: torch.nn.Module, args: Any, __: Any) -> None:
        self.rows = (self.rows or 0) + args[0].shape[1]

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def assert_matches(results: list[dict[str, object]]) -> None:
    for rank, res in enumerate(results):
        assert res["shape_ok"], (rank, res)
        assert isinstance(res["rel_err"], float) and res["rel_err"] < REL_TOL, (rank, res)
        assert res["same_on_every_rank"], (rank, res)
        assert res["tuple_path_equal"], (rank, res)
        assert res["direct_call_unchanged"], (rank, res)


@torch.no_grad()
def count_pairs(
    ctx: sf_comm.Context,
    strategy: str,
    make_model: Builder,
    make_inputs: Builder,
    *args: Any,
    text: TextLayout = "auto",
) -> int:
    """Query x key pairs this rank's local attention computes, summed over heads and batch
    (text queries ride in the video query buffers: Note [Text rows owned once]; sharded text
    is ordinary sequence), under ``parallelize(..., text=text)``."""
    pairs = 0
    original = sf_attn.hybrid.attention_with_lse

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Any:
        nonlocal pairs
        pairs += q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]
        return original(q, k, v, **kwargs)

    sp = parallelize(make_model(*args), ctx=ctx, strategy=strategy, text=text)
    sf_attn.hybrid.attention_with_lse = counting
    try:
        sp(**make_inputs(*args))
    finally:
        sf_attn.hybrid.attention_with_lse = original
    return pairs


def assert_work_split(counts: list[int], *, full_video: int, full_text: int, tokens: int) -> None:
    """Every (query, key) pair of the layer, text queries included, computed exactly once in
    total, and each rank's share 1/world within a few rows (token and text-row chunks differ
    by one)."""
    world = len(counts)
    full = full_video + full_text
    assert sum(counts) == full, (counts, full)
    rows = tokens + full_text * tokens // max(full_video, 1)  # video + text query rows
    for rank, mine in enumerate(counts):
        assert abs(mine / full - 1 / world) <= 2 * world / rows, (rank, mine / full)


def check_work_split(
    ranks: Any,
    strategy: str,
    make_model: Builder,
    make_inputs: Builder,
    *,
    full_video: int,
    full_text: int,
    tokens: int,
    layouts: tuple[TextLayout, ...] = ("replicated", "sharded"),
) -> None:
    """:func:`count_pairs` on 4 ranks (2x2) under each text layout, then
    :func:`assert_work_split`: the same pairs, once in total, whatever the layout."""
    for text in layouts:
        counts = ranks(4).run(
            count_pairs,
            strategy,
            make_model,
            make_inputs,
            text=text,
            topology="2x2",
            transport="shm",
        )
        assert_work_split(counts, full_video=full_video, full_text=full_text, tokens=tokens)
