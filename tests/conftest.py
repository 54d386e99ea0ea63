"""Shared test fixtures: a pool of CPU ranks per world size, kept alive for the session.

Tier 2 (distributed-on-CPU) tests call ``ranks(world).run(fn, ..., topology=, transport=)``;
``fn`` is a module-level function of the test module, run on every rank with that rank's
cached context. Spawning ranks costs seconds, so one pool per world size serves every test
and every hypothesis example; a failed call restarts its pool, so it cannot poison others.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from sf_comm.launch import RankPool

# Waits inside ranks time out well before pytest-timeout would kill the suite.
RANK_TIMEOUT_S = "30"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow; run with --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    run_slow = config.getoption("--run-slow") or os.environ.get("SF_RUN_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ranks() -> Iterator[Callable[[int], RankPool]]:
    """``ranks(world)`` -> a started :class:`RankPool` of that size (cached per session)."""
    pools: dict[int, RankPool] = {}

    def get(world: int) -> RankPool:
        if world not in pools:
            pools[world] = RankPool(
                world, env={"SF_TIMEOUT": RANK_TIMEOUT_S, "SF_POOL_GRACE": "15"}
            )
        return pools[world].start()

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``tiny_pipeline(family)`` -> a complete tiny pipeline directory of that family
    (:func:`sf_models.tiny.make_tiny`), written once per session."""
    from sf_models.tiny import make_tiny

    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            made[family] = str(make_tiny(tmp_path_factory.mktemp(f"tiny-{family}"), family))
        return made[family]

    return get
