"""Feature matching between SAEs and firing shifts, against direct computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.optimize import linear_sum_assignment

from qsae.analysis.matching import candidate_pairs, match_features, unit_rows
from qsae.errors import LineageError
from qsae.jobs.compare import CompareConfig, run_compare
from qsae.lake.store import QuestionLake
from qsae.sae.model import file_sha256

from ..helpers import random_shard, small_spec


def test_sae_against_itself_matches_everything_with_similarity_one():
    W = np.random.default_rng(0).standard_normal((200, 32))
    m = match_features(W, W)
    assert m.a.size == 200 and np.array_equal(m.a, m.b)
    np.testing.assert_allclose(m.similarity, 1.0, atol=1e-5)
    assert m.emerged.size == 0 and m.vanished.size == 0


def test_permuted_copy_recovers_the_permutation():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((500, 48))
    perm = rng.permutation(500)
    m = match_features(W, 3.0 * W[perm])  # scale does not matter: directions do
    mapping = dict(zip(m.b, m.a))
    assert all(mapping[j] == perm[j] for j in range(500))


def test_replaced_directions_are_exactly_emerged_and_vanished():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((300, 128))
    replaced = np.array([3, 77, 150, 299])
    W2 = W.copy()
    W2[replaced] = rng.standard_normal((4, 128))
    m = match_features(W, W2, threshold=0.7)
    assert list(m.emerged) == list(replaced) and list(m.vanished) == list(replaced)
    kept = np.setdiff1d(np.arange(300), replaced)
    pairs = dict(zip(m.a, m.b))
    assert all(pairs[i] == i for i in kept)


def test_assignment_is_optimal_against_scipy_and_blocks_agree():
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((40, 12)), rng.standard_normal((55, 12))
    m = match_features(A, B, candidates=100)  # complete candidate graph: the exact optimum
    C = unit_rows(A) @ unit_rows(B).T
    r, c = linear_sum_assignment(-np.maximum(C, 0))
    assert m.similarity.sum() == pytest.approx(np.maximum(C[r, c], 0).sum(), rel=1e-6)
    assert len(set(m.a)) == m.a.size and len(set(m.b)) == m.b.size  # one to one
    full = candidate_pairs(unit_rows(A), unit_rows(B), k=5, block=1000)
    small = candidate_pairs(unit_rows(A), unit_rows(B), k=5, block=7)
    np.testing.assert_allclose(full.best_a, C.max(1), rtol=1e-5)
    np.testing.assert_allclose(small.best_b, C.max(0), rtol=1e-5)
    assert set(zip(full.rows, full.cols)) == set(zip(small.rows, small.cols))
    with pytest.raises(ValueError, match="different widths"):
        match_features(A, rng.standard_normal((5, 13)))


def _sae_file(path, W_dec_rows):
    d_sae, d = W_dec_rows.shape
    torch.save({"W_enc": torch.tensor(W_dec_rows, dtype=torch.float32), "W_dec": torch.tensor(W_dec_rows.T, dtype=torch.float32),
                "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d)}, path)
    return str(path)


def _code_lake(url, d_sae, seed, sae_file=None):
    lineage = {"sae_sha256": {"3": file_sha256(sae_file)}, "sae_source": sae_file} if sae_file else {}
    spec = small_spec(n_questions=24, layers=(3,), n_samples=4, d_model=8, d_sae=d_sae, k=3, lineage=lineage)
    lake = QuestionLake.open_or_create(url, spec, mode="overwrite")
    rng = np.random.default_rng(seed)
    for shard in range(lake.n_shards - 1):  # the last shard stays undone and must be ignored
        data = random_shard(lake, shard, seed)
        r = lake.shard_region(shard)
        data["question_text"] = np.array([f"question {i}?" for i in range(r.start, r.stop)], dtype=object)
        rows = int(np.prod(data["codes_idx"].shape[:-1]))
        data["codes_idx"] = np.sort(np.stack([rng.choice(d_sae, 3, replace=False) for _ in range(rows)]), 1) \
            .reshape(data["codes_idx"].shape).astype(np.uint8)
        data["codes_val"] = (rng.exponential(1.0, data["codes_val"].shape) * (rng.random(data["codes_val"].shape) < 0.7)).astype(np.float32)
        lake.write_shard(shard, data)
    return url


def test_firing_shifts_equal_a_direct_count(tmp_path):
    rng = np.random.default_rng(4)
    W = rng.standard_normal((40, 8))
    perm = rng.permutation(40)
    base = _sae_file(tmp_path / "base.pt", W)
    ft = _sae_file(tmp_path / "ft.pt", W[perm])
    lake_a = _code_lake(str(tmp_path / "a.zarr"), 40, 1, base)
    lake_b = _code_lake(str(tmp_path / "b.zarr"), 40, 2, ft)
    # Lakes whose codes come from other SAEs than those compared are refused, naming both hashes.
    with pytest.raises(LineageError, match=r"fine-tuned lake .*b\.zarr has layer-3 codes from an SAE with sha256"):
        run_compare(CompareConfig(base_sae=base, finetuned_sae=base, layer=3, base_lake=lake_a, finetuned_lake=lake_b))
    with pytest.raises(LineageError, match="the base lake"):
        run_compare(CompareConfig(base_sae=ft, finetuned_sae=ft, layer=3, base_lake=lake_a, finetuned_lake=lake_b))
    # Default: prompt-end codes, the same prompts through both models.
    res = run_compare(CompareConfig(base_sae=base, finetuned_sae=ft, layer=3, base_lake=lake_a, finetuned_lake=lake_b,
                                    threshold=0.9))
    t = res.table

    def direct(url, idx_name="codes_idx", val_name="codes_val"):
        ds = xr.open_zarr(url).load()
        done = ds.done.values
        idx, val = ds[idx_name].values[0][done], ds[val_name].values[0][done]
        rows = idx.reshape(-1, idx.shape[-1]).shape[0]
        return np.array([((idx == f) & (val != 0)).sum() / rows for f in range(40)])

    fa, fb = direct(lake_a, "prompt_codes_idx", "prompt_codes_val"), direct(lake_b, "prompt_codes_idx", "prompt_codes_val")
    np.testing.assert_allclose(t.base_frequency.values, fa)
    np.testing.assert_allclose(t.finetuned_frequency.values, fb)
    assert res.summary["inputs"]["position"] == "prompt_end" and "same prompts" in res.summary["inputs"]["meaning"]
    assert res.summary["tokens"] == {"base": 16, "finetuned": 16}  # one row per finished question
    # Completion-end codes on request, labelled as different inputs.
    res = run_compare(CompareConfig(base_sae=base, finetuned_sae=ft, layer=3, base_lake=lake_a, finetuned_lake=lake_b,
                                    threshold=0.9, inputs="completion_end"))
    t = res.table
    assert "inputs differ" in res.summary["inputs"]["meaning"]
    fa, fb = direct(lake_a), direct(lake_b)
    np.testing.assert_allclose(t.base_frequency.values, fa)
    np.testing.assert_allclose(t.finetuned_frequency.values, fb)
    np.testing.assert_allclose(t.frequency_shift.values, fb[t.finetuned_feature.values] - fa[t.base_feature.values])
    assert all(perm[b] == a for a, b in zip(t.base_feature.values, t.finetuned_feature.values))
    assert res.summary["emerged"] == 0
    shifts = t.frequency_shift.values
    listed = res.summary["largest_shifts"]
    # the largest shifts, and never a feature whose frequency did not move (they read as noise)
    assert len(listed) == min(10, int((shifts != 0).sum())) and res.summary["features_shifted"] == int((shifts != 0).sum())
    assert all(r["base_frequency"] != r["finetuned_frequency"] for r in listed)
    assert min(abs(r["finetuned_frequency"] - r["base_frequency"]) for r in listed) >= np.sort(np.abs(shifts))[-len(listed)]
    text = res.to_text()
    assert "fire more or less often" in text and f"{listed[0]['base']:>6} -> {listed[0]['finetuned']}" in text
    assert json.loads(res.to_json())["largest_shifts"] == listed
    # a feature set compared with itself: no shift, and the summary says so instead of listing zeros
    same = run_compare(CompareConfig(base_sae=base, finetuned_sae=base, layer=3, base_lake=lake_a,
                                     finetuned_lake=lake_a, threshold=0.9, out=str(tmp_path / "same.zarr")))
    assert same.summary["largest_shifts"] == [] and same.summary["features_shifted"] == 0
    assert "no matched feature fires more or less often" in same.to_text()
    stored = xr.open_zarr(lake_b, group="compare/layer_3")
    assert stored.attrs["summary"]["matched"] == 40 and open(res.figure, "rb").read(4) == b"\x89PNG"


def test_finetune_lowers_the_loss_and_saves_a_loadable_model(tiny_qwen_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qsae.lm.finetune import finetune
    from qsae.lm.models import load_model

    lm = load_model(str(tiny_qwen_dir), device="cpu", dtype="float32")
    texts = ["Q: Who wrote Hamlet?\nA: Shakespeare\n", "Q: What is the capital of France?\nA: Paris\n"]
    enc = lm.tokenizer(texts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        before = float(lm.model(enc, labels=enc).loss)
    out = finetune(lm, texts, tmp_path / "ft", steps=30, batch=2, lr=3e-3)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        after = float(reloaded(enc, labels=enc).loss)
    assert after < before - 1.0 and (out / "qsae_revision.txt").read_text().startswith("finetune-")


def test_prompt_end_shifts_need_the_same_prompts_in_both_lakes(tmp_path):
    rng = np.random.default_rng(5)
    W = rng.standard_normal((40, 8))
    base = _sae_file(tmp_path / "base.pt", W)
    lake_a = _code_lake(str(tmp_path / "a.zarr"), 40, 1, base)
    lake_b = _code_lake(str(tmp_path / "b.zarr"), 40, 2, base)
    lake = QuestionLake.open(lake_b, mode="r+")
    lake.update_attrs(prompt_template="Question: {question}\nAnswer:")
    with pytest.raises(LineageError, match="other prompt templates: prompt-end firing shifts need the same prompts"):
        run_compare(CompareConfig(base_sae=base, finetuned_sae=base, layer=3, base_lake=lake_a, finetuned_lake=lake_b))
    res = run_compare(CompareConfig(base_sae=base, finetuned_sae=base, layer=3, base_lake=lake_a, finetuned_lake=lake_b,
                                    inputs="completion_end"))
    assert res.summary["inputs"]["position"] == "completion_end"


def test_compare_needs_a_layer_both_lakes_hold(tmp_path):
    """No magic default layer: the only layer, or the one asked for if both lakes hold it."""
    from qsae.errors import LayerError

    W = np.random.default_rng(6).standard_normal((40, 8))
    base = _sae_file(tmp_path / "base.pt", W)
    lake = _code_lake(str(tmp_path / "a.zarr"), 40, 1, base)
    res = run_compare(CompareConfig(base_sae=base, finetuned_sae=base, base_lake=lake, finetuned_lake=lake,
                                    out=str(tmp_path / "out.zarr")))
    assert res.summary["matched"] == 40  # the lakes' only layer, 3
    with pytest.raises(LayerError, match=r"layer 5 is not in both lakes \(layers \[\[3\], \[3\]\]\)"):
        run_compare(CompareConfig(base_sae=base, finetuned_sae=base, layer=5, base_lake=lake, finetuned_lake=lake))
