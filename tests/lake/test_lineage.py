"""One lineage, one policy: every analysis that decodes a lake's codes refuses the same way an
SAE file that did not make them (issue 27: four places, three policies before)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qsae
from qsae.errors import LineageError, SAEFormatError
from qsae.lake.lineage import RESULT_KEYS, CodesMismatchError, Lineage
from qsae.lake.store import QuestionLake, open_lake
from qsae.sae.model import file_sha256

from ..helpers import random_shard, small_spec


def test_lineage_names_the_codes_sae_and_what_a_result_records():
    attrs = {"model": "m", "sae_source": {"3": "/a/layer3.sae.pt"}, "sae_sha256": {"3": "ab" * 32}, "d_sae": 40,
             "k": 3, "created": "today", "dataset": "d"}
    lin = Lineage.of(attrs)
    made = lin.codes_sae(3)
    assert (made.source, made.sha256, made.d_sae, made.k) == ("/a/layer3.sae.pt", "ab" * 32, 40, 3)
    assert lin.model == "m" and lin.seed is None
    assert lin.record() == {k: attrs[k] for k in RESULT_KEYS if k in attrs} and "created" not in lin.record()
    made.check("ab" * 32, 40)
    with pytest.raises(CodesMismatchError, match="not the same file"):
        made.check("cd" * 32, 40)
    with pytest.raises(CodesMismatchError, match="d_sae=41"):
        made.check("ab" * 32, 41)
    assert issubclass(CodesMismatchError, LineageError) and issubclass(CodesMismatchError, SAEFormatError)
    with pytest.raises(SAEFormatError, match="holds no SAE codes"):
        Lineage.of({"d_sae": None}).codes_sae(3)


@pytest.fixture()
def coded_lake(tmp_path):
    d_model, d_sae, k = 8, 40, 3
    g = torch.Generator().manual_seed(0)
    sae_path = tmp_path / "layer3.sae.pt"
    weights = {"W_enc": torch.randn(d_sae, d_model, generator=g), "W_dec": torch.randn(d_model, d_sae, generator=g),
               "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_model)}
    torch.save(weights, sae_path)
    spec = small_spec(n_questions=32, layers=(3,), n_samples=2, d_model=d_model, d_sae=d_sae, k=k,
                      resid_dtype="float32",
                      lineage={"sae_source": str(sae_path), "sae_sha256": {"3": file_sha256(sae_path)}})
    lake = QuestionLake.open_or_create(str(tmp_path / "lake.zarr"), spec)
    for shard in range(lake.n_shards):
        data = random_shard(lake, shard)
        data["resid_nonfinite"][:] = 0
        data["resid_prompt_nonfinite"][:] = 0
        lake.write_shard(shard, data)
    return lake, sae_path, weights


def test_every_reader_of_codes_refuses_another_sae_file_in_the_same_words(coded_lake):
    from qsae.jobs.codes import load_sae_for
    from qsae.jobs.reconstruction import run_reconstruction
    from qsae.jobs.rivalry import RivalryConfig, _decoder, plan_rivalry
    from qsae.jobs.verify import verify

    lake, sae_path, weights = coded_lake
    ds = open_lake(lake.url)
    assert load_sae_for(ds, 3).info.sha256 == ds.attrs["sae_sha256"]["3"]  # the right file loads everywhere
    plan = plan_rivalry(RivalryConfig(store=lake.url, rule="median", entropy="exact", n_perm=0, n_boot=0))
    assert _decoder(plan, 3)[1] is None
    torch.save({**weights, "W_dec": weights["W_dec"] * 2}, sae_path)  # another file at the recorded path

    from qsae.jobs.configs import ReconstructionConfig

    with pytest.raises(CodesMismatchError, match="not the same file"):
        run_reconstruction(ReconstructionConfig(store=lake.url))
    with pytest.raises(CodesMismatchError, match="not the same file"):
        qsae.reconstruct(ds, layer=3)
    report = verify(lake.url)
    assert not report.ok and any("not the same file" in p for p in report.problems), report.text()
    W, why = _decoder(plan, 3)  # the rivalry's per-prompt score reports it instead of failing the study
    assert W is None and "not the same file" in why
    from qsae.jobs.compare import check_codes_from

    with pytest.raises(LineageError, match="not the same file"):
        check_codes_from(ds, lake.url, 3, {"sha256": file_sha256(sae_path), "d_sae": 40, "source": str(sae_path)},
                         "base")
    np.testing.assert_array_equal(ds.layer.values, [3])
