"""Tier 1: hot-path helpers: ``sf_attn.joint.join_tokens`` (the copy-free ``cat([text,
image], dim=1)``) and the gathered-ring setting (Note [Gathered ring] in sf_attn.hybrid)."""

from __future__ import annotations

import pytest
import torch

from sf_attn.hybrid import gather_setting
from sf_attn.joint import join_tokens


def test_adjacent_views_join_without_a_copy() -> None:
    """Catches the join copying the [text, image] stream a processor cut into two views (one
    copy of q, k and v per layer on the hot path), or joining them wrongly."""
    for batch in (1, 3):
        stream = torch.randn(batch, 11, 4, 8)
        text, image = stream[:, :3], stream[:, 3:]
        joined = join_tokens(text, image)
        assert torch.equal(joined, stream)
        assert joined.data_ptr() == stream.data_ptr()  # a view: no copy


def test_other_tensors_are_concatenated() -> None:
    """Catches a join that aliases tensors which are not neighbours in memory: separate
    allocations, the parts in the other order, a gap between them, other strides."""
    stream = torch.randn(2, 11, 4, 8)
    cases = [
        (torch.randn(2, 3, 4, 8), torch.randn(2, 8, 4, 8)),
        (stream[:, 3:], stream[:, :3]),  # swapped
        (stream[:, :3], stream[:, 4:]),  # a gap of one token
        (stream[:, :3, :2], stream[:, 3:, :2]),  # heads sliced: still one view (joined as one)
        (stream[:, :3].transpose(2, 3).contiguous().transpose(2, 3), stream[:, 3:]),
    ]
    for a, b in cases:
        joined = join_tokens(a, b)
        assert torch.equal(joined, torch.cat([a, b], dim=1))
    empty = stream[:, :0]
    assert join_tokens(empty, stream) is stream and join_tokens(stream, empty) is stream


def test_gather_setting_names_what_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a mistyped SF_GATHER_KV silently meaning "auto" (or a negative budget meaning
    never), instead of an error that lists the allowed values."""
    monkeypatch.delenv("SF_GATHER_KV", raising=False)
    monkeypatch.delenv("SF_GATHER_KV_MB", raising=False)
    assert gather_setting() == ("never", 1024 * 2**20)
    monkeypatch.setenv("SF_GATHER_KV", "sometimes")
    with pytest.raises(
        ValueError, match=r"SF_GATHER_KV must be one of \['never', 'auto', 'always'\]"
    ):
        gather_setting()
    monkeypatch.setenv("SF_GATHER_KV", "never")
    monkeypatch.setenv("SF_GATHER_KV_MB", "-3")
    with pytest.raises(ValueError, match="SF_GATHER_KV_MB must be a number of MiB >= 0, got '-3'"):
        gather_setting()
