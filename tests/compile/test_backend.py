"""Tier 1: the ``streamfusion`` backend's registration, options, and its world-of-one path.

Single process, no process group: the backend must then be its inner backend exactly (the
same graph object handed over), so it costs nothing over ``backend="inductor"``.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from sf_compile import CompileOptions, streamfusion_backend
from sf_compile.backend import _inner
from sf_compile.token_pass import check_static

from .models import build


def test_registered_through_entry_point() -> None:
    """Catches the entry point missing or pointing at the wrong object: then
    ``torch.compile(model, backend="streamfusion")`` fails unless sf_compile was imported.
    A fresh interpreter that never imports sf_compile must find and run the backend."""
    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "streamfusion"]
    assert ep.value == "sf_compile.backend:streamfusion_backend"
    code = (
        "import sys, torch\n"
        "assert 'streamfusion' in torch._dynamo.list_backends()\n"
        "f = torch.compile(lambda x: x * 2, backend='streamfusion', "
        "options={'inner_backend': 'eager'})\n"
        "assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stratgy": "ring"}, r"unknown option\(s\) \['stratgy'\]; known options are \['strategy'"),
        ({"strategy": "spiral"}, r"strategy='spiral' is unknown; choose one of"),
        ({"transport": "pigeon"}, r"transport='pigeon' is unknown"),
        ({"on_unsupported": "ignore"}, r"on_unsupported='ignore'; allowed: 'gather', 'error'"),
        ({"overlap": "yes"}, r"overlap must be True, False or 'auto'"),
        ({"ctx": "not a context"}, r"ctx must be an sf_comm context"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, Any], message: str) -> None:
    """Catches a typo'd or invalid option being ignored (the user would silently get the
    default strategy or no overlap) instead of a ValueError naming the field and what fits."""
    with pytest.raises(ValueError, match=message):
        CompileOptions.from_mapping(options)


def test_debug_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches ``SF_COMPILE_DEBUG`` being ignored, or an explicit option not winning over it."""
    monkeypatch.setenv("SF_COMPILE_DEBUG", str(tmp_path))
    assert CompileOptions().debug_dir == str(tmp_path)
    assert CompileOptions(debug=False).debug_dir is None
    monkeypatch.setenv("SF_COMPILE_DEBUG", "1")
    assert CompileOptions().debug_dir == "sf_compile_debug"
    monkeypatch.setenv("SF_COMPILE_DEBUG", "0")
    assert CompileOptions().debug_dir is None


def _attention(x: torch.Tensor) -> torch.Tensor:
    q = x.view(2, 7, 2, 4).transpose(1, 2)
    return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 7, 8) + 1


def test_world_of_one_hands_the_same_graph_over(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Catches the backend rewriting (or copying) the graph when there is nothing to split:
    with one rank the inner backend must receive Dynamo's graph module and example inputs
    themselves, so the result is plain Inductor's, guards and all. Also checks the debug
    dump says so."""
    monkeypatch.setenv("SF_COMPILE_DEBUG", str(tmp_path))
    gm = fx.symbolic_trace(_attention)
    inputs = [torch.randn(2, 7, 8)]
    code = gm.code
    seen: list[tuple[Any, Any]] = []

    def inner(graph: fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        seen.append((graph, example_inputs))
        return graph.forward

    streamfusion_backend(gm, inputs, options={"inner_backend": inner})
    assert seen[0][0] is gm and seen[0][1] is inputs
    assert gm.code == code
    (dump,) = tmp_path.iterdir()
    assert "world size 1, the graph goes to the inner backend unchanged" in dump.read_text()


def test_default_inner_backend_is_torch_compiles_inductor() -> None:
    """Catches the default inner backend differing from ``torch.compile(backend="inductor")``
    with the same mode/options (other config = other kernels = not "plain Inductor")."""
    assert _inner(CompileOptions(), None) == torch._TorchCompileInductorWrapper(None, None, None)
    opts = CompileOptions(inner_options={"max_autotune": True})
    mode = "max-autotune-no-cudagraphs"
    assert _inner(opts, mode) != torch._TorchCompileInductorWrapper(None, None, None)
    assert _inner(CompileOptions(), mode) == torch._TorchCompileInductorWrapper(mode, None, None)


def test_symbolic_shapes_are_refused() -> None:
    """Catches dynamic (symbolic) token counts reaching the pass, which needs each rank's
    token count at compile time: the error must say to compile with ``dynamic=False``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(_attention, tracing_mode="symbolic")(torch.randn(2, 7, 8))
    with pytest.raises(ValueError, match=r"needs static shapes.*dynamic=False"):
        check_static(gm)


@pytest.mark.compile
def test_world_of_one_equals_inductor() -> None:
    """Catches any difference between ``backend="streamfusion"`` on one rank and
    ``backend="inductor"``: the same graph must compile to the same kernels, so the outputs
    are bit-identical (a rewritten graph would round differently)."""
    model, kwargs, output = build("tiny_dit")
    torch._dynamo.reset()
    with torch.no_grad():
        plain = output(torch.compile(model, backend="inductor", dynamic=False)(**kwargs))
        torch._dynamo.reset()
        ours = output(torch.compile(model, backend="streamfusion", dynamic=False)(**kwargs))
        eager = output(model(**kwargs))
    for a, b, e in zip(ours, plain, eager):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)  # sanity: Inductor vs eager
