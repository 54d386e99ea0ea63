"""The backend benchmark's model builder and its world-of-one command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from sf_compile.compile_bench import flux_stack, main


def test_unknown_dims_are_named() -> None:
    """Catches a typo in ``--dims`` building some other model silently."""
    with pytest.raises(ValueError, match=r"dims='flux2'.*\['flux1', 'tiny'\]"):
        flux_stack("flux2")


def test_flux1_preset_has_flux1_block_sizes() -> None:
    """Catches the FLUX.1-sized preset drifting from FLUX.1's blocks (24 heads x 128 = 3072
    wide, 4x MLP, T5 4096-dim and 512-token prompt, CLIP 768), which would make the GPU
    benchmark time a different workload. Built on the meta device: no memory, no compute."""
    model, inputs = flux_stack("flux1", grid=(64, 64), layers=(1, 1), device="meta")
    assert model.transformer_blocks[0].attn.to_q.weight.shape == (3072, 3072)
    assert model.single_transformer_blocks[0].proj_mlp.weight.shape == (4 * 3072, 3072)
    assert model.context_embedder.weight.shape == (3072, 4096)
    assert inputs["hidden_states"].shape == (1, 64 * 64, 64)  # 1024 px: 64 x 64 tokens
    assert inputs["encoder_hidden_states"].shape == (1, 512, 4096)
    assert inputs["pooled_projections"].shape == (1, 768)


@pytest.mark.compile
@pytest.mark.slow
def test_world1_command_compares_identical_models(tmp_path: Path) -> None:
    """Catches the benchmark timing two different computations (other weights, inputs or a
    rewritten graph): with one rank both compiled models must give bit-identical outputs, and
    the JSON record must carry the medians it printed."""
    out = tmp_path / "w1.json"
    main(["world1", "--repeats", "3", "--layers", "1x1", "--height", "80", "--width", "112",
          "--device", "cpu", "--json", str(out)])  # fmt: skip
    record = json.loads(out.read_text())
    assert record["max_abs_diff"] == 0.0
    assert record["median_a_s"] > 0 and record["median_b_s"] > 0
    assert record["ratio"] == pytest.approx(record["median_a_s"] / record["median_b_s"])
    assert record["text"] == 6 and record["device"] == "cpu"


def test_pixels_must_map_to_whole_tokens() -> None:
    """Catches a height or width that is not a whole number of 16-pixel tokens being
    rounded down silently (the benchmark would time a smaller image than asked)."""
    with pytest.raises(SystemExit, match="multiples of 16"):
        main(["world1", "--height", "1000", "--width", "1024", "--device", "cpu"])
