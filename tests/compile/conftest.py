"""Inductor's cache for the compile tests: a fixed directory under the git-ignored ``build/``,
so a second run (and every rank of a pool, which inherits the environment when spawned)
reuses compiled kernels; the first compile of a tiny model takes 15-70 s on CPU.
Set before any rank pool starts, at collection; an explicit TORCHINDUCTOR_CACHE_DIR wins."""

from __future__ import annotations

import os
from pathlib import Path

INDUCTOR_CACHE = Path(__file__).resolve().parents[2] / "build" / "inductor-cache"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE))
