"""The steering experiment on a real lake (SmolLM2, the demo SAE, layer 15) and its rivalry
result: the paper's verdicts from the batched loop, m = 0 and a huge m, the level of the
calibrated test when the "rivals" are random pairs, its power on a direction known to move
the answer, a killed run resumed, and the errors said before a model loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from qsae.errors import LayerError, ResultMissingError
from qsae.jobs.configs import SteerConfig
from qsae.jobs.steer import finish_steer, plan_steer, run_steer, steer_prompts

from ..lm.test_steer import paper_loop

REPO = Path(__file__).resolve().parents[2]
QSAE = str(Path(sys.executable).parent / "qsae")


@pytest.fixture(scope="module")
def steer_lake(tmp_path_factory, smollm2):
    """16 PopQA questions x 6 samples through SmolLM2 and the demo SAE at layer 15, and their
    rivalry result (median split: every question in a group)."""
    from qsae.jobs.capture import CaptureConfig, run_capture
    from qsae.jobs.demo import ensure_demo_sae
    from qsae.jobs.rivalry import RivalryConfig, run_rivalry

    tmp = tmp_path_factory.mktemp("steer")
    cfg = CaptureConfig(model="smollm2", sae=str(ensure_demo_sae()), layers=[15], limit=16, n_samples=6,
                        max_new_tokens=6, questions_per_shard=8, questions_per_batch=8, device="cpu", dtype="float32",
                        store=str(tmp / "lake.zarr"))
    run_capture(cfg)
    run_rivalry(RivalryConfig(store=cfg.store, rule="median", entropy="exact", n_perm=9, n_boot=0, correctness=False,
                              min_group=4))
    return tmp, cfg.store


def _cfg(store, **kw):
    base = dict(store=store, pairs=3, prompts=6, controls=4, randoms=2, multipliers=[5.0, 40.0], n_perm=199,
                device="cpu", dtype="float32")
    return SteerConfig(**{**base, **kw})


def _group(store, group):
    return xr.open_zarr(store, group=group, consolidated=False).load()


def test_verdicts_equal_the_papers_loop(steer_lake, smollm2):
    """Every condition's text and flip verdict as the paper's generate loop gives them (without
    early exits the texts, with them the verdicts)."""
    tmp, store = steer_lake
    res = run_steer(_cfg(store, early_exit=False), lm=smollm2)
    plan = plan_steer(_cfg(store, early_exit=False))
    ds = _group(store, res.group)
    assert ds.done.all() and res.n_prompts == 6 and res.layer == 15
    D, M = len(plan.kinds), len(plan.multipliers)
    vectors = torch.from_numpy(plan.directions[:, None] * plan.multipliers[None, :, None]).float().reshape(D * M, -1)
    differ, verdicts_differ, total = 0, 0, 0
    for p in range(3):  # three prompts against the reference (every condition of each)
        ref = paper_loop(smollm2, plan.prompts[p], torch.cat([torch.zeros(1, vectors.shape[1]), vectors]))
        base, steered = ref[0].strip(), ref[1:]
        ours = ds.text.values[:, :, p].reshape(-1)
        differ += sum(a != b for a, b in zip(ours, steered))
        verdicts_differ += sum((a.strip().lower() != base.lower()) != bool(f)
                               for a, f in zip(steered, ds.flipped.values[:, :, p].reshape(-1)))
        total += len(steered)
    assert differ <= max(1, total // 50) and verdicts_differ <= max(1, total // 50), (differ, verdicts_differ, total)
    early = run_steer(_cfg(store), lm=smollm2)  # early exits: the same verdicts, shorter work
    assert np.array_equal(_group(store, early.group).flipped.values, ds.flipped.values)
    for kind in early.flip_rate:
        np.testing.assert_array_equal(early.flip_rate[kind], res.flip_rate[kind])
    assert res.paper_rows and set(res.paper_rows[0]) >= {"feature_i", "feature_j", "correlation", "multiplier",
                                                         "flip_rate_B", "flip_rate_random", "total_prompts"}


def test_no_push_no_flip_and_a_huge_push_flips_nearly_everything(steer_lake, smollm2):
    tmp, store = steer_lake
    zero = run_steer(_cfg(store, multipliers=[0.0], units="norm"), lm=smollm2)
    assert all((v == 0).all() for v in zero.flip_rate.values())
    huge = run_steer(_cfg(store, multipliers=[30.0], units="norm"), lm=smollm2)
    assert min(float(v.mean()) for v in huge.flip_rate.values()) >= 0.9
    assert any("swamps the residual" in c for c in huge.cautions)


@pytest.mark.slow
def test_random_pairs_as_rivals_hold_the_level(steer_lake, smollm2):
    """The across-pairs p when the "rival" pairs are random pairs of the group's features: at
    most 2 of 10 seeds below 0.05."""
    tmp, store = steer_lake
    ps = []
    for seed in range(10):
        res = run_steer(_cfg(store, rivals="random", seed=seed, pairs=5, controls=5, randoms=0, multipliers=[20.0],
                             prompts=8), lm=smollm2)
        ps.append(float(res.tests.p_greater[0]))
    assert sum(p <= 0.05 for p in ps) <= 2, ps


def test_a_direction_known_to_move_the_answer_is_found(steer_lake, smollm2):
    """The "rival" directions replaced by one that lowers every prompt's greedy first token (the
    mean gradient of its log-probability at the layer's last position, a little noise each):
    the across-pairs test finds them against the control pairs at a small multiplier."""
    from qsae.lm.hooks import decoder_layers

    tmp, store = steer_lake
    cfg = _cfg(store, pairs=4, controls=8, randoms=0, multipliers=[5.0], n_perm=999)
    plan = plan_steer(cfg)
    tok, model = smollm2.tokenizer, smollm2.model
    grads = []
    for prompt in plan.prompts:
        ids = torch.tensor([tok(prompt, add_special_tokens=True).input_ids])
        held = {}

        def keep(module, inputs, output):
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            hidden.retain_grad()
            held["h"] = hidden

        handle = decoder_layers(model)[15].register_forward_hook(keep)
        try:
            with torch.enable_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
                lp[int(lp.argmax())].backward()
        finally:
            handle.remove()
        g = held["h"].grad[0, -1].double().numpy()
        grads.append(g / np.linalg.norm(g))
    down = -np.mean(grads, axis=0)
    rng = np.random.default_rng(0)
    for i in range(4):
        v = down / np.linalg.norm(down) + 0.1 * rng.standard_normal(down.size) / np.sqrt(down.size)
        plan.directions[i] = v / np.linalg.norm(v)
    steer_prompts(plan, list(range(len(plan.prompts))), lm=smollm2)
    res = finish_steer(plan)
    assert res.tests.p_greater[0] <= 0.01 and res.tests.statistic[0] > 0.3, res.to_text()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(steer_lake, smollm2):
    tmp, store = steer_lake
    whole = run_steer(_cfg(store, prompts=8), lm=smollm2)
    ref = _group(store, whole.group)
    import shutil

    shutil.rmtree(Path(store) / whole.group)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [QSAE, "steer", store, "--no-prefect", "--pairs", "3", "--prompts", "8", "--multipliers", "5,40",
            "--set", "controls=4", "--set", "randoms=2", "--set", "n_perm=199", "--set", "device=cpu",
            "--set", "dtype=float32", "--set", "prompts_per_step=1"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    done_file = Path(store) / whole.group / "done"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once some prompts are written and not all
            if done_file.exists():
                try:
                    n = int(_group(store, whole.group).done.values.sum())
                except Exception:  # noqa: BLE001 - being written
                    n = 0
                if 2 <= n < 8:
                    break
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read()[-2000:])
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    part = _group(store, whole.group)
    assert 2 <= int(part.done.sum()) < 8
    again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    got = _group(store, whole.group)
    for name in ("flipped", "text", "baseline_text", "done"):
        np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=name)


def test_errors_are_said_before_a_model_loads(tmp_path, steer_lake):
    from qsae.jobs.preflight import preflight

    from ..helpers import synthetic_lake

    bare = synthetic_lake(tmp_path / "bare.zarr")  # codes, no rivalry result
    with pytest.raises(ResultMissingError, match="no result group 'rivalry/paper': rerun `qsae rivalry"):
        preflight(_cfg(bare))
    tmp, store = steer_lake
    with pytest.raises(LayerError, match="layer 3 has no rivalry result"):
        preflight(_cfg(store, layer=3))
    with pytest.raises(Exception, match="nope"):
        preflight(_cfg(store, model="/nope/model"))
