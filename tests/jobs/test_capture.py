"""Capture into the lake, checked against fresh forward passes and hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch

from qsae.errors import ConfigMismatchError, DatasetError, SAEModelMismatchError
from qsae.jobs.capture import CaptureConfig, plan_capture, run_capture
from qsae.lake.store import open_lake
from qsae.lm.hooks import run_with_capture
from qsae.sae.formats import load_sae

from ..helpers import tiny_capture, write_sae_folder


def small_cfg(tmp, model, sae, layers, **kw) -> CaptureConfig:
    base = dict(model=model, sae=str(sae), layers=layers, limit=6, n_samples=3, max_new_tokens=6,
                questions_per_shard=4, questions_per_chunk=2, questions_per_batch=2, device="cpu", dtype="float32",
                store=str(tmp / "lake.zarr"), resid_dtype="float32", seed=7)
    base.update(kw)
    return CaptureConfig(**base)


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, smollm2):
    tmp = tmp_path_factory.mktemp("cap-smol")
    sae = write_sae_folder(tmp / "SAE-L0_8", 576, 256, [2, 9])
    cfg = small_cfg(tmp, "smollm2", sae, [2, 9], sae_k=None)
    stats = run_capture(cfg).stats[0]
    return cfg, open_lake(cfg.store).load(), stats


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, tiny_qwen_dir):
    tmp = tmp_path_factory.mktemp("cap-qwen")
    sae = write_sae_folder(tmp / "sae", 64, 128, [1, 3])
    cfg = small_cfg(tmp, str(tiny_qwen_dir), sae, [1, 3], sae_k=5, resid_dtype="float16", limit=5)
    run_capture(cfg)
    return cfg, open_lake(cfg.store).load()


def _lm(cfg):
    from qsae.jobs.capture import get_model

    return get_model(cfg).lm


def _fresh_residuals(cfg, ds, q_index, sample):
    lm = _lm(cfg)
    prompt_len = int(ds.prompt_len[q_index])
    n = int(ds.completion_len[q_index, sample])
    q_text = str(ds.question_text[q_index].values)
    prompt_ids = lm.tokenizer(cfg.prompt_template.format(question=q_text)).input_ids
    assert len(prompt_ids) == prompt_len
    ids = prompt_ids + ds.completion_ids[q_index, sample, :n].values.tolist()
    _, cap = run_with_capture(lm.model, torch.tensor([ids]), layers=cfg.layers, stop_early=True)
    return {layer: (cap.resid[layer][0, prompt_len - 1], cap.resid[layer][0, len(ids) - 1]) for layer in cfg.layers}


def test_lake_is_complete_and_shaped(smol_run):
    cfg, ds, stats = smol_run
    assert ds.done.all() and ds.sizes["question"] == 6 and ds.sizes["sample"] == 3
    assert list(ds.layer.values) == [2, 9] and ds.attrs["k"] == 8  # k from the name "L0_8"
    assert stats.questions == 6 and stats.samples == 18 and stats.new_tokens == int(ds.completion_len.sum())
    assert (ds.completion_len >= 1).all() and (ds.completion_len <= 6).all()
    lens = ds.completion_len.values
    ids = ds.completion_ids.values
    for q in range(6):
        for s in range(3):
            assert (ids[q, s, lens[q, s]:] == -1).all() and (ids[q, s, : lens[q, s]] >= 0).all()
    assert (ds.first_token.values == ids[:, :, 0]).all()
    assert set(ds.attrs["sae_sha256"]) == {"2", "9"}
    # the dataset's row fields, kept for stratified analyses (PopQA's prop as relation, popularity)
    from qsae.lm.datasets import load_questions

    rows = load_questions("popqa-demo", limit=6).questions
    assert [str(x) for x in ds.relation.values] == [q.meta["prop"] for q in rows]
    assert [str(x) for x in ds.subject.values] == [q.meta["subj"] for q in rows]
    assert ds.s_pop.values.tolist() == [int(q.meta["s_pop"]) for q in rows] and (ds.o_pop.values > 0).all()


@pytest.mark.parametrize("run", ["smol_run", "qwen_run"])
def test_stored_residual_equals_fresh_forward(request, run):
    cfg, ds = request.getfixturevalue(run)[:2]
    for q_index, sample in [(0, 0), (3, 2), (4, 1)]:
        fresh = _fresh_residuals(cfg, ds, q_index, sample)
        for li, layer in enumerate(cfg.layers):
            prompt_x, comp_x = (t.numpy() for t in fresh[layer])
            stored = ds.resid.values[li, q_index, sample].astype(np.float32)
            stored_prompt = ds.resid_prompt.values[li, q_index].astype(np.float32)
            tol = 1e-4 if cfg.resid_dtype == "float32" else 2e-3
            np.testing.assert_allclose(stored, comp_x, rtol=tol, atol=tol * np.abs(comp_x).max())
            np.testing.assert_allclose(stored_prompt, prompt_x, rtol=tol, atol=tol * np.abs(prompt_x).max())
            np.testing.assert_allclose(ds.resid_norm.values[li, q_index, sample], np.linalg.norm(comp_x), rtol=1e-4)


@pytest.mark.parametrize("run", ["smol_run", "qwen_run"])
def test_stored_codes_are_topk_of_stored_residual(request, run):
    cfg, ds = request.getfixturevalue(run)[:2]
    for li, layer in enumerate(cfg.layers):
        sae = load_sae(cfg.sae, layer=layer, k=cfg.sae_k)
        x = torch.from_numpy(ds.resid.values[li].reshape(-1, ds.sizes["d_model"]).astype(np.float32))
        idx, vals = sae.encode_topk(x)
        k = ds.sizes["k"]
        np.testing.assert_array_equal(ds.codes_idx.values[li].reshape(-1, k), idx.numpy())
        np.testing.assert_allclose(ds.codes_val.values[li].reshape(-1, k), vals.numpy(), rtol=1e-6, atol=1e-6)
        assert (np.diff(ds.codes_idx.values[li].astype(int), axis=-1) > 0).all()  # sorted, unique
        xp = torch.from_numpy(ds.resid_prompt.values[li].astype(np.float32))
        np.testing.assert_array_equal(ds.prompt_codes_idx.values[li], sae.encode_topk(xp)[0].numpy())


def test_entropy_and_first_logprob_equal_hand_computation(smol_run):
    cfg, ds, _ = smol_run
    lm = _lm(cfg)
    for q in range(3):
        prompt = cfg.prompt_template.format(question=str(ds.question_text[q].values))
        with torch.inference_mode():
            logits = lm.model(torch.tensor([lm.tokenizer(prompt).input_ids])).logits[0, -1].double().numpy()
        p = scipy.special.softmax(logits / cfg.sampling.temperature)
        np.testing.assert_allclose(ds.entropy.values[q], scipy.stats.entropy(p), rtol=1e-5)
        # the nucleus the samples come from: most likely tokens while the mass before them < top_p
        srt = np.sort(p)[::-1]
        nucleus = srt[(np.cumsum(srt) - srt) < cfg.sampling.top_p]
        np.testing.assert_allclose(ds.nucleus_entropy.values[q], scipy.stats.entropy(nucleus / nucleus.sum()), rtol=1e-4)
        for s in range(3):
            tok = int(ds.first_token[q, s])
            np.testing.assert_allclose(ds.first_logprob.values[q, s], np.log(p[tok]), rtol=1e-4, atol=1e-4)
        _, counts = np.unique(ds.first_token.values[q], return_counts=True)
        np.testing.assert_allclose(ds.sample_entropy.values[q], scipy.stats.entropy(counts))


def test_correct_flag_follows_popqa_rule(smol_run):
    _, ds, _ = smol_run
    for q in range(6):
        answers = json.loads(str(ds.answers[q].values))
        for s in range(3):
            text = str(ds.completion[q, s].values).lower()
            assert bool(ds.correct[q, s]) == any(a.lower() in text for a in answers)


def test_same_seed_gives_identical_lake_and_resume_skips_done(tmp_path, qwen_run):
    cfg0, ds0 = qwen_run
    cfg = cfg0.model_copy(update={"store": str(tmp_path / "again.zarr")})
    run_capture(cfg)
    ds = open_lake(cfg.store).load()
    for name in ds0.data_vars:
        np.testing.assert_array_equal(ds[name].values, ds0[name].values, err_msg=name)
    # A rerun of a complete store has nothing pending.
    assert plan_capture(cfg).pending == []
    other = cfg.model_copy(update={"store": str(tmp_path / "seed8.zarr"), "seed": 8})
    run_capture(other)
    assert not np.array_equal(open_lake(other.store).completion_ids.values, ds0.completion_ids.values)


def test_other_config_on_existing_store_is_refused(qwen_run, tmp_path):
    cfg, _ = qwen_run
    for change in ({"n_samples": 4}, {"layers": [1]}, {"temperature": 0.7}, {"resid_dtype": "float32"}):
        with pytest.raises(ConfigMismatchError, match="different config") as err:
            plan_capture(cfg.model_copy(update=change))
        # the way out that deletes data says how much it deletes
        assert "mode='overwrite' would DELETE it, with its 5 done of 5 questions" in str(err.value)


def test_sae_of_another_model_is_refused(qwen_run, tmp_path):
    cfg, _ = qwen_run
    sae = write_sae_folder(tmp_path / "wide", 576, 64, [1, 3])
    with pytest.raises(SAEModelMismatchError, match=r"d_model=576.*hidden_size=64"):
        plan_capture(cfg.model_copy(update={"sae": str(sae), "store": str(tmp_path / "x.zarr")}))


def test_long_prompts_truncated_or_refused(qwen_run, tmp_path, caplog):
    import logging

    cfg, _ = qwen_run
    assert CaptureConfig().max_prompt_tokens == 512  # a budget by default: one long row never costs 50x silently
    cut = cfg.model_copy(update={"store": str(tmp_path / "cut.zarr"), "max_prompt_tokens": 8, "limit": 2,
                                 "questions_per_shard": 2})
    with caplog.at_level(logging.WARNING, logger="qsae.jobs.capture"):
        run_capture(cut)
    assert "2 prompts are longer than 8 tokens and are cut from the left (ids [" in caplog.text
    ds = open_lake(cut.store)
    assert ds.prompt_truncated.values.all() and (ds.prompt_len.values == 8).all()
    with pytest.raises(DatasetError, match="longer than 8 tokens"):
        plan_capture(cut.model_copy(update={"store": str(tmp_path / "refuse.zarr"), "on_long_prompt": "refuse"}))


def test_a_model_generation_config_does_not_change_samples_or_entropy(tmp_path, tiny_qwen_dir):
    """A generation_config.json with repetition_penalty, no_repeat_ngram_size and suppress_tokens
    (transformers 5 applies them before qsae's sampler unless neutralised): step-0 scores must
    be logits / T, and the lake must equal one from the same model without that file."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_qwen_dir, plain)
    (plain / "generation_config.json").unlink(missing_ok=True)
    tricky = tmp_path / "tricky"
    shutil.copytree(plain, tricky)
    lm = load_model_for_test(plain)
    with torch.inference_mode():
        probe = lm.model(torch.tensor([lm.tokenizer("Q: probe\nA:").input_ids])).logits[0, -1]
    suppressed = probe.topk(5).indices.tolist()  # the likeliest first tokens: suppressing them shows
    (tricky / "generation_config.json").write_text(json.dumps({
        "repetition_penalty": 1.5, "no_repeat_ngram_size": 1, "suppress_tokens": suppressed,
        "bos_token_id": lm.tokenizer.bos_token_id, "eos_token_id": lm.tokenizer.eos_token_id}))
    lakes = {}
    for name, folder in (("plain", plain), ("tricky", tricky)):
        cfg = tiny_capture(folder, None, tmp_path / f"{name}.zarr", layers=(1,), limit=3, n_samples=6,
                           temperature=0.7)
        run_capture(cfg)
        lakes[name] = open_lake(cfg.store).load()
    a, b = lakes["plain"], lakes["tricky"]
    for q in range(3):
        prompt = cfg.prompt_template.format(question=str(b.question_text[q].values))
        with torch.inference_mode():
            logits = lm.model(torch.tensor([lm.tokenizer(prompt).input_ids])).logits[0, -1].double().numpy()
        p = scipy.special.softmax(logits / 0.7)
        np.testing.assert_allclose(b.entropy.values[q], scipy.stats.entropy(p), rtol=1e-5)
    for name in ("entropy", "first_token", "first_logprob", "completion_ids"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def load_model_for_test(folder):
    from qsae.lm.models import load_model

    return load_model(str(folder), device="cpu", dtype="float32")


def test_mlp_output_capture_with_a_relu_sae(tmp_path, smollm2):
    """The 9B study's setting on SmolLM2: a ReLU SAE (the release's checkpoint format) reading
    layer 4's MLP output. The lake records the hook; the stored activations are the MLP output
    (not the residual) of a fresh forward pass, the codes the SAE's top-k of them."""
    from qsae.errors import SAEFormatError

    from ..helpers import write_relu_checkpoint

    path = write_relu_checkpoint(tmp_path / "relu" / "layer4.pt", 576, 1152, seed=1)
    cfg = small_cfg(tmp_path, "smollm2", path, [4], sae_k=64, limit=2, n_samples=2, max_new_tokens=4)
    run_capture(cfg)
    ds = open_lake(cfg.store).load()
    assert ds.attrs["hook"] == "mlp_out" and "MLP" in ds.resid.attrs["description"]
    lm = _lm(cfg)
    sae = load_sae(str(path), layer=4, k=64)
    for q in range(2):
        prompt_len, n = int(ds.prompt_len[q]), int(ds.completion_len[q, 1])
        prompt = lm.tokenizer(cfg.prompt_template.format(question=str(ds.question_text[q].values))).input_ids
        ids = prompt + ds.completion_ids[q, 1, :n].values.tolist()
        _, cap = run_with_capture(lm.model, torch.tensor([ids]), layers=[4], mlp_layers=[4], stop_early=False)
        mlp_prompt, mlp_end = cap.mlp[4][0, prompt_len - 1], cap.mlp[4][0, len(ids) - 1]
        torch.testing.assert_close(torch.from_numpy(ds.resid_prompt.values[0, q]), mlp_prompt, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(ds.resid.values[0, q, 1]), mlp_end, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(torch.from_numpy(ds.resid_prompt.values[0, q]), cap.resid[4][0, prompt_len - 1])
        idx, val = sae.encode_topk(torch.from_numpy(ds.resid_prompt.values[0, q]), k=64)
        np.testing.assert_array_equal(ds.prompt_codes_idx.values[0, q], idx.numpy())
        np.testing.assert_allclose(ds.prompt_codes_val.values[0, q], val.numpy(), rtol=1e-5, atol=1e-6)
    assert (ds.codes_val.values >= 0).all()  # a ReLU SAE's codes
    # The 9B study's comparison runs on MLP-output lakes (here a lake against itself: no shifts).
    from qsae.jobs.compare import CompareConfig, run_compare

    res = run_compare(CompareConfig(base_sae=str(path), finetuned_sae=str(path), layer=4, base_lake=cfg.store,
                                    finetuned_lake=cfg.store, out=str(tmp_path / "cmp.zarr")))
    assert res.summary["matched"] == 1152 and res.summary["inputs"]["position"] == "prompt_end"
    assert float(np.abs(res.table.frequency_shift.values).max()) == 0.0 and res.table.base_frequency.values.sum() > 0
    # A residual-stream SAE cannot be asked to read the MLP output, nor the MLP SAE the residual.
    resid_sae = write_sae_folder(tmp_path / "resid", 576, 64, [4])
    with pytest.raises(SAEFormatError, match="reads resid_post, but capture was asked for hook=mlp_out"):
        plan_capture(cfg.model_copy(update={"sae": str(resid_sae), "hook": "mlp_out", "store": str(tmp_path / "y.zarr")}))
    with pytest.raises(SAEFormatError, match="reads mlp_out, but capture was asked for hook=resid_post"):
        plan_capture(cfg.model_copy(update={"hook": "resid_post", "store": str(tmp_path / "z.zarr")}))


def test_sampling_fields_nest_and_flat_forms_still_work():
    """Sampling is its own group (the lake's `sampling` lineage); flat names keep working in
    constructors, files, --set and model_copy, and a mistyped one is still refused."""
    import pydantic

    nested = CaptureConfig(sampling={"n_samples": 4, "top_p": 0.8})
    flat = CaptureConfig(n_samples=4, top_p=0.8)
    assert nested == flat and flat.sampling.n_samples == 4 and flat.sampling.temperature == 1.0
    assert CaptureConfig.model_validate(flat.model_dump()) == flat  # a dump reloads (config files, Prefect)
    copied = flat.model_copy(update={"max_new_tokens": 5, "store": "x.zarr"})
    assert copied.sampling.max_new_tokens == 5 and copied.sampling.n_samples == 4 and copied.store == "x.zarr"
    with pytest.raises(pydantic.ValidationError, match="n_sample"):
        CaptureConfig(n_sample=4)
