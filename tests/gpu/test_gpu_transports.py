"""Tier 3 (GPU only): the ``torch-symm`` and ``nvshmem`` transports, 2 and 4 ranks on ONE GPU.

The ranks are spawned processes sharing cuda:0 with a gloo process group for set-up (NCCL
refuses two ranks on one GPU). The checks live in ``tools/gpu_smoke.py`` so that the
standalone smoke run and these tests are the same; each world is spawned once per session
and every test asserts on its per-check rows. Data movement is compared bit-exact
(``torch.equal``) on every rank against what that rank computes it must receive.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys

import pytest
import torch

_TOOLS = str(pathlib.Path(__file__).resolve().parents[2] / "tools")
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)  # spawned ranks inherit sys.path and import gpu_smoke by name

import gpu_smoke  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TRANSPORTS = list(gpu_smoke.TRANSPORTS)


@functools.cache
def _world(transport: str, world: int) -> dict[str, gpu_smoke.Row]:
    """Rows of one spawned world, by check name (spawned once per (transport, world))."""
    rows = gpu_smoke.run_world(transport, world, budget_s=120.0, timeout_s=20.0)
    return {row.check: row for row in rows}


def _require(transport: str, world: int, checks: tuple[str, ...]) -> None:
    if transport == "nvshmem" and importlib.util.find_spec("nvshmem") is None:
        pytest.skip("nvshmem4py is not installed")
    rows = _world(transport, world)
    create = rows.get("create")
    if create is not None and create.status == "SKIP":
        pytest.skip(f"{transport} unavailable here: {create.detail}")
    problems = [
        row
        for row in rows.values()
        if row.status == "FAIL" and row.check in ("startup", "create", "worker")
    ]
    problems += [rows[c] for c in checks if c in rows and rows[c].status != "PASS"]
    missing = [c for c in checks if c not in rows]
    if problems or missing:
        text = gpu_smoke.format_rows(problems)
        pytest.fail(f"{transport} x{world}: missing checks {missing}\n{text}", pytrace=False)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_data_movement_bit_exact(transport: str, world: int) -> None:
    """Catches wrong routing, lost or reordered pieces, an inbox slot overwritten before the
    receiver copied it out (credit bugs), wrong bookkeeping of uneven, empty or multi-piece
    messages, non-contiguous sends, handles waited out of order, stream-ordered waiting
    without a host block, and barriers (world and sub-group) that do not return.
    """
    _require(transport, world, gpu_smoke.DATA_CHECKS)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_size_mismatch_is_reported(transport: str) -> None:
    """Catches ranks that disagree on a message size silently delivering garbage: the
    receiver must raise an error naming itself, the operation, and both sizes.
    """
    _require(transport, 2, ("mismatch",))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeout_names_rank_and_op(transport: str) -> None:
    """Catches a wait that hangs forever when a live peer never sends: CommTimeout must come
    within the transport timeout and name the rank and the operation.
    """
    _require(transport, 2, ("timeout",))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dead_peer_is_detected(transport: str) -> None:
    """Catches a rank that waits out the whole timeout (or forever) on a peer that has died:
    the error must come quickly, say the peer died, and not be a timeout.
    """
    _require(transport, 4, ("peer_death",))
