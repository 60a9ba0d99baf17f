"""The demo SAE shipped in qsae/data/demo_sae is what its recipe (`qsae demo-sae`) trains."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qsae.jobs.demo import SHIPPED_SAE, ensure_demo_sae, recipe_record, train_demo_sae


def test_the_demo_uses_the_shipped_sae_and_its_record_matches_the_file():
    assert ensure_demo_sae() == SHIPPED_SAE
    record = json.loads((SHIPPED_SAE / "recipe.json").read_text())
    digest = hashlib.sha256((SHIPPED_SAE / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert record["sae_weights_sha256"] == digest
    cfg = json.loads((SHIPPED_SAE / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", 32, 576, 2304)


@pytest.mark.slow
def test_the_recipe_reproduces_the_shipped_file(tmp_path, cache_dir, smollm2):
    """Bitwise on the torch build and CPU kind it was made with; elsewhere the same SAE up to
    float rounding (summation order differs between CPU kernels)."""
    out = train_demo_sae(tmp_path / "sae", cache=cache_dir, progress=False)
    shipped = load_file(SHIPPED_SAE / "sae_weights.safetensors")
    fresh = load_file(out / "sae_weights.safetensors")
    assert shipped.keys() == fresh.keys()
    record = json.loads((SHIPPED_SAE / "recipe.json").read_text())
    here = recipe_record(out, {})
    same_build = all(record[k] == here[k] for k in ("torch", "cpu_capability", "machine", "threads"))
    if same_build:
        for name in shipped:
            assert torch.equal(shipped[name], fresh[name]), name
        assert here["sae_weights_sha256"] == record["sae_weights_sha256"]
    else:  # another CPU or torch: the same features (decoder directions), not the same bits
        a, b = shipped["W_dec"], fresh["W_dec"]
        rows = 0 if a.shape[0] == cfg_d_sae(SHIPPED_SAE) else 1
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1 - rows)
        assert float(np.median(cos.numpy())) > 0.9, float(np.median(cos.numpy()))


def cfg_d_sae(folder) -> int:
    return int(json.loads((folder / "cfg.json").read_text())["d_sae"])
