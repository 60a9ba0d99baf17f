"""The demo SAE shipped in qsae/data/demo_sae is what its recipe (`qsae demo-sae`) trains."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qsae.jobs.demo import SHIPPED_SAE, SMALL_BUDGET, ensure_demo_sae, recipe_record, train_demo_sae


def test_the_demo_uses_the_shipped_sae_and_its_record_matches_the_file():
    assert ensure_demo_sae() == SHIPPED_SAE
    record = json.loads((SHIPPED_SAE / "recipe.json").read_text())
    digest = hashlib.sha256((SHIPPED_SAE / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert record["sae_weights_sha256"] == digest
    cfg = json.loads((SHIPPED_SAE / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", 32, 576, 2304)


@pytest.mark.slow
def test_the_recipe_on_a_small_budget_gives_the_recorded_file(tmp_path, cache_dir, smollm2):
    """`qsae demo-sae`'s recipe at SMALL_BUDGET (the whole recipe, fewer tokens and steps) gives,
    bit for bit, the file whose sha256 was recorded when the shipped SAE was made, on the torch
    build and CPU kind it was made with (two full-budget trainings gave identical tensors too;
    the full run takes ~4 minutes, so the suite checks the small one). Elsewhere summation
    order may differ between CPU kernels: then the SAE must at least train to finite weights."""
    out = train_demo_sae(tmp_path / "sae", cache=cache_dir, progress=False, **SMALL_BUDGET)
    record = json.loads((SHIPPED_SAE / "recipe.json").read_text())
    here = recipe_record(out, {})
    assert record["small_budget"]["tokens"] == SMALL_BUDGET["tokens"]
    fresh = load_file(out / "sae_weights.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in fresh.values())
    if all(record[k] == here[k] for k in ("torch", "cpu_capability", "machine", "threads")):
        assert here["sae_weights_sha256"] == record["small_budget"]["sae_weights_sha256"]
        got = json.loads((out / "recipe.json").read_text())["final"]
        assert got["fve"] == record["small_budget"]["final"]["fve"]
    else:
        assert np.isfinite(json.loads((out / "recipe.json").read_text())["final"]["fve"])
