"""Feature dashboards (issue 25): statistics against brute force on the dense activations, the
accessor helpers, decoder logit effects against a hand computation, the Neuronpedia export's
structure, and what a user sees in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qsae.analysis.features import layer_features
from qsae.jobs.features import FeaturesConfig, logit_effects, run_features
from qsae.lake.store import open_lake

from ..helpers import write_sae_folder


@pytest.fixture(scope="module")
def feature_lake(captured):
    cfg = captured(layers=(1, 3), d_sae=96, sae_k=6, limit=10, n_samples=4, questions_per_shard=4)
    return cfg, open_lake(cfg.store).load()


def _dense(ds, layer, which):
    li = list(ds.layer.values).index(layer)
    if which == "prompt":
        idx, val = ds.prompt_codes_idx.values[li], ds.prompt_codes_val.values[li]
    else:
        idx = ds.codes_idx.values[li].reshape(-1, ds.sizes["k"])
        val = ds.codes_val.values[li].reshape(-1, ds.sizes["k"])
    dense = np.zeros((idx.shape[0], int(ds.attrs["d_sae"])), np.float64)
    np.put_along_axis(dense, idx.astype(np.int64), val, axis=1)
    return dense


def test_layer_statistics_equal_brute_force(feature_lake):
    _, ds = feature_lake
    lf = layer_features(ds, 3, top_n=3)
    P, C = _dense(ds, 3, "prompt"), _dense(ds, 3, "completion")
    np.testing.assert_allclose(lf.freq_prompt, (P != 0).mean(0))
    np.testing.assert_allclose(lf.freq_completion, (C != 0).mean(0))
    np.testing.assert_allclose(lf.mean_activation, np.r_[P, C].mean(0), rtol=1e-5, atol=1e-7)
    assert set(lf.features) == set(np.flatnonzero(((P != 0) | False).any(0) | (C != 0).any(0)))
    assert (lf.hist.sum(1) == (P != 0).sum(0) + (C != 0).sum(0)).all()
    for f in lf.features[:20]:
        want = np.argsort(-P[:, f], kind="stable")[:3]
        want = [q for q in want if P[q, f] != 0]
        assert [q for q, _ in lf.top_prompt.get(int(f), [])] == want
        rows = np.flatnonzero(P[:, f] != 0)
        if rows.size:  # co-firing by Jaccard, by hand
            both = (P[rows] != 0).sum(0).astype(float)
            both[f] = 0
            jac = both / np.maximum(1, rows.size + (P != 0).sum(0) - both)
            got = [g for g, _ in lf.cofire[int(f)]]
            assert got == [g for g in np.argsort(-jac, kind="stable")[:5] if both[g] > 0]


def test_accessor_helpers(feature_lake):
    _, ds = feature_lake
    C = _dense(ds, 1, "completion")
    np.testing.assert_allclose(ds.qsae.mean_activation(layer=1).values, C.mean(0), rtol=1e-5, atol=1e-7)
    answers = ds.qsae.answers()
    assert len(answers) == ds.sizes["question"] and all(isinstance(a, list) and a for a in answers)
    f = int(np.argmax((C != 0).sum(0)))
    top = ds.qsae.top_questions_with_samples(f, layer=1, n=3, which="completion")
    per_q = C.reshape(ds.sizes["question"], ds.sizes["sample"], -1)[:, :, f].max(1)
    assert top.question.tolist() == [int(ds.question[q]) for q in np.argsort(-per_q, kind="stable")[:len(top)]]
    assert all(len(s) == ds.sizes["sample"] for s in top.samples) and isinstance(top.answers[0], list)
    co = ds.qsae.cofiring(f, layer=1, n=4, which="completion")
    assert (co.together > 0).all() and (np.diff(co.jaccard.values) <= 0).all()


def test_logit_effects_equal_hand_computation_and_skip_with_a_reason(feature_lake, tiny_qwen_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from qsae.jobs.codes import load_sae_for

    _, ds = feature_lake
    attrs = dict(ds.attrs)
    effects, skipped = logit_effects(attrs, 3, np.array([5, 17]), n=4)
    assert skipped is None and set(effects) == {5, 17}
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32)
    sae = load_sae_for(attrs, 3)
    gain = 1.0 + model.model.norm.weight.detach()  # Qwen3.5's norm scales by (1 + weight)
    want = (sae.W_dec[17].detach() * gain) @ model.lm_head.weight.detach().T
    top = torch.topk(want, 4).values.tolist()
    np.testing.assert_allclose([v for _, v in effects[17]["pos"]], top, rtol=1e-4)
    assert [v for _, v in effects[17]["neg"]] == sorted(v for _, v in effects[17]["neg"])
    gone, why = logit_effects({**attrs, "model_path": "/nowhere/model"}, 3, np.array([5]))
    assert gone == {} and "not available locally" in why


def test_dashboard_and_neuronpedia_export(feature_lake, tmp_path):
    cfg, ds = feature_lake
    out = tmp_path / "np"
    res = run_features(FeaturesConfig(store=cfg.store, layers=[3], neuronpedia=str(out), top_n=3))
    index = Path(res.layers[3]["index"])
    assert index.exists() and (index.parent / "feature.html").exists()
    blocks = sorted((index.parent / "data").glob("block_*.js"))
    assert blocks and all(re.match(r"^qsaeBlock\(\d+, ", b.read_text()) for b in blocks)
    batches = sorted((out / "layer_3").glob("batch-*.json"))
    assert batches
    n_features = 0
    for path in batches:
        batch = json.loads(path.read_text())
        assert batch["layer"] == 3 and batch["model_id"] == ds.attrs["model"] and batch["sae_set"] == ds.attrs["sae_source"]
        for feat in batch["features"]:
            n_features += 1
            assert isinstance(feat["feature_index"], int) and 0 < feat["frac_nonzero"] <= 1
            for key in ("pos_str", "pos_values", "neg_str", "neg_values", "freq_hist_data_bar_heights",
                        "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values"):
                assert isinstance(feat[key], list), key
            assert len(feat["pos_str"]) == len(feat["pos_values"]) == 10
            assert len(feat["freq_hist_data_bar_heights"]) == len(feat["freq_hist_data_bar_values"])
            assert feat["activations"]
            for act in feat["activations"]:
                assert len(act["tokens"]) == len(act["values"]) and act["values"][-1] != 0
                assert all(isinstance(t, str) for t in act["tokens"])
    assert n_features == res.layers[3]["features"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _render(url: str, screenshot: Path | None = None) -> str:
    """The DOM after the page's scripts ran, in headless Chromium (and a screenshot)."""
    exe = _chromium()
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--window-size=1300,1600"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    return subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(_chromium() is None and not os.environ.get("QSAE_REQUIRE_BROWSER"),
                    reason="headless Chromium is not installed (apt-get install chromium; CI installs it)")
def test_what_a_user_sees_in_chromium(feature_lake, tmp_path):
    cfg, ds = feature_lake
    res = run_features(FeaturesConfig(store=cfg.store, layers=[1], top_n=3))
    index = Path(res.layers[1]["index"])
    dom = _render(index.as_uri(), tmp_path / "index.png")
    rows = re.findall(r'<tr><td><a href="feature.html#(\d+)">', dom)
    assert len(rows) == res.layers[1]["features"]  # the table the user sees, one row per firing feature
    lf = layer_features(ds, 1, top_n=3)
    f = max(lf.top_prompt, key=lambda g: lf.top_prompt[g][0][1])
    q = lf.top_prompt[f][0][0]
    page = _render(index.parent.joinpath("feature.html").as_uri() + f"#{f}", tmp_path / "feature.png")
    assert f"Feature {f} · layer 1" in page
    text = str(ds.question_text[q].values)
    assert text.replace("'", "&#39;") in page or text in page or text.replace('"', "&quot;") in page
    assert (tmp_path / "feature.png").stat().st_size > 10_000


def test_token_lake_dashboard_encodes_with_the_named_sae(tmp_path, smollm2):
    """A token lake (qsae collect): --sae encodes the stored activations; each feature's top
    contexts are token windows whose highlighted token is the top-activating one, by brute force."""
    import torch

    from qsae.errors import SAEFormatError
    from qsae.jobs.collect import CollectConfig, collect
    from qsae.sae.formats import load_sae

    cfg = CollectConfig(model="smollm2", layers=[3], context_length=16, windows_per_batch=3, max_tokens=6 * 15,
                        resid_dtype="float32", device="cpu", dtype="float32", store=str(tmp_path / "tok.zarr"))
    collect(cfg, lm=smollm2)
    sae_dir = write_sae_folder(tmp_path / "sae", 576, 64, [3])
    with pytest.raises(SAEFormatError, match="token lake"):
        run_features(FeaturesConfig(store=cfg.store, top_n=3))
    res = run_features(FeaturesConfig(store=cfg.store, sae=str(sae_dir), sae_k=4, top_n=3, neuronpedia=str(tmp_path / "np")))
    index = Path(res.layers[3]["index"])
    recs = {}
    for block in (index.parent / "data").glob("block_*.js"):
        text = block.read_text()
        recs.update({int(k): v for k, v in json.loads(text[text.index(",") + 1:text.rindex(")")]).items()})
    ds = open_lake(cfg.store).load()
    sae = load_sae(str(sae_dir), layer=3, k=4)
    idx, val = sae.encode_topk(torch.from_numpy(ds.acts.values[0].astype(np.float32)))
    dense = np.zeros((ds.sizes["token"], sae.d_sae))
    np.put_along_axis(dense, idx.numpy().astype(np.int64), val.detach().numpy(), axis=1)
    dense[ds.special.values] = 0
    assert set(recs) == set(np.flatnonzero((dense != 0).any(0)))
    f = max(recs, key=lambda g: recs[g]["max"])
    best = int(np.argmax(dense[:, f]))
    top = recs[f]["top_contexts"][0]
    assert top["token"] == best and top["tok"] == smollm2.tokenizer.decode([int(ds.token_id[best])])
    np.testing.assert_allclose(top["activation"], dense[best, f], rtol=1e-5)
    batch = json.loads(next((tmp_path / "np" / "layer_3").glob("batch-*.json")).read_text())
    act = batch["features"][0]["activations"][0]
    assert act["position"] == "token" and len(act["tokens"]) == len(act["values"])
