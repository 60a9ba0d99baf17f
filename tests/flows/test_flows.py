"""The Prefect flows against a real (test) Prefect server: results, resume, artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.capture import capture_flow
from flows.reconstruction import reconstruction_flow
from flows.rivalry import rivalry_flow
from flows.train import train_flow
from qsae.jobs.reconstruction import ReconstructionConfig
from qsae.jobs.rivalry import RivalryConfig
from qsae.jobs.train import TrainConfig
from qsae.lake.store import QuestionLake, open_lake

from ..helpers import prefect_artifacts, prefect_logs

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]


@pytest.fixture(scope="module")
def flow_lake(tmp_path_factory, captured):
    """A captured lake (in-process) the flow tests read; the capture test writes its own, the
    analyses write their result groups into this one."""
    cfg = captured(limit=12, n_samples=4, questions_per_shard=4, questions_per_batch=4)
    return tmp_path_factory.mktemp("flows"), cfg


@pytest.fixture(scope="module")
def rivalry_lake(flow_lake):
    """The flow lake with its rivalry results (through the flow)."""
    tmp, cfg = flow_lake
    out = rivalry_flow(config=RivalryConfig(store=cfg.store, rule="median", entropy="exact", n_perm=19, n_boot=50))
    return tmp, cfg, out


def test_capture_flow_maps_shards_resumes_and_reports(flow_lake):
    tmp, ref_cfg = flow_lake
    cfg = ref_cfg.model_copy(update={"store": str(tmp / "flow-capture.zarr")})
    first = capture_flow(config=cfg, shards_per_task=1, shards=[0, 2])  # a partial run, as if cut off
    assert first.done == 8 and first.shards == [0, 2]
    lake = QuestionLake.open(cfg.store)
    assert lake.pending_shards() == [1]
    resumed = capture_flow(config=cfg, shards_per_task=2)
    assert resumed.shards == [1] and resumed.done == 12
    again = capture_flow(config=cfg)
    assert again.shards == [] and again.done == 12
    arts = prefect_artifacts("qsae-capture")
    assert arts and "12 / 12" in arts[0].data
    # qsae's own log lines are in the runs' logs with no PREFECT_LOGGING_EXTRA_LOGGERS set (flows.logs)
    import os

    assert "PREFECT_LOGGING_EXTRA_LOGGERS" not in os.environ
    lines = prefect_logs("qsae.jobs.capture")
    assert any("questions captured" in e.message and e.flow_run_id for e in lines), [e.message for e in lines][:5] and "xr.open_zarr" in arts[0].data
    # the flow's lake equals an in-process capture of the same config
    a, b = open_lake(cfg.store).load(), open_lake(ref_cfg.store).load()
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_rivalry_and_reconstruction_flows_write_results_and_artifacts(rivalry_lake):
    tmp, cfg, out = rivalry_lake
    assert out.group == "rivalry/paper" and sorted(out.summary["by_layer"]) == [1, 2]  # every layer
    corr = out.summary["by_layer"][2]["correctness"]  # identifiers as keys, what each is beside them
    assert set(corr["auroc"]) == set(corr["predictors"]) == {"rivalry_score", "max_first_token_prob",
                                                             "neg_exact_entropy"}
    assert corr["predictors"]["rivalry_score"].startswith("rivalry score")
    res = open_lake(cfg.store, group="rivalry/layer_2/paper")
    assert res.sizes["question"] == 12 and set(np.unique(res.group.values)) == {"ambiguous", "unambiguous"}
    art = prefect_artifacts("qsae-rivalry")[0].data
    assert "| ambiguous |" in art and "**p calibrated**" in art and "not calibrated" in art
    assert art.count("](data:image/png;base64,") >= 2  # the figures travel inside the artifact
    rec = reconstruction_flow(config=ReconstructionConfig(store=cfg.store))
    assert [(r["layer"], r["position"]) for r in rec.rows()] == [
        (1, "prompt_end"), (1, "completion_end"), (2, "prompt_end"), (2, "completion_end")]
    table = prefect_artifacts("qsae-reconstruction")[0]
    assert table.type == "table" and "fve_legacy" in str(table.data) and "completion_end" in str(table.data)
    labels = prefect_artifacts("qsae-reconstruction-figure")[0].data
    assert "near-duplicates" in labels and "SAEBench's core metrics: no" in labels


def test_train_flow_trains_and_reports(tmp_path):
    from ..helpers import sparse_dictionary_data, write_token_lake

    x, _ = sparse_dictionary_data(n_tokens=6000)
    write_token_lake(str(tmp_path / "tokens.zarr"), x)
    out = train_flow(config=TrainConfig(store=str(tmp_path / "tokens.zarr"), d_sae=64, k=3, batch_size=256, epochs=1,
                                        lr=2e-3, out=str(tmp_path / "sae"), log_every=5))
    assert out.steps == 6000 // 256 and (tmp_path / "sae" / "cfg.json").exists()
    assert json.loads(out.to_json())["out"] == str(tmp_path / "sae") and "SAELens folder" in out.to_text()
    assert "| topk | 64 |" in prefect_artifacts("qsae-train")[0].data


def test_every_deployment_in_prefect_yaml_validates_against_its_flow():
    """A scheduled run must not fail on its own parameters (the rivalry deployment once passed `layer`)."""
    import importlib
    from pathlib import Path

    import yaml
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} >= {"capture", "rivalry", "steer", "reconstruction-nightly", "pipeline"}
    for dep in spec["deployments"]:
        path, name = dep["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        flow.validate_parameters(dep.get("parameters", {}))  # raises ParameterTypeError on a bad field
        # and what the Prefect API enforces on a deployment's runs: the parameters' JSON schema
        schema = parameter_schema(flow.fn).model_dump_for_openapi()
        validate(dep.get("parameters", {}), schema, raise_on_error=True, ignore_required=True)


def test_features_flow_links_the_dashboards_and_reads_the_rivalry_groups(rivalry_lake):
    """After a rivalry run, the dashboards show each feature's share of prompt-end firing in the
    ambiguous and unambiguous groups; the artifact links each layer's index."""
    import json
    from pathlib import Path

    from flows.features import features_flow
    from qsae.jobs.features import FeaturesConfig

    tmp, cfg, _ = rivalry_lake
    out = features_flow(config=FeaturesConfig(store=cfg.store, layers=[2], top_n=3))
    index = Path(out.layers[2]["index"])
    assert index.exists()
    art = prefect_artifacts("qsae-features")[0].data
    assert str(index) in art and "| 2 |" in art
    recs = {}
    for block in (index.parent / "data").glob("block_*.js"):
        text = block.read_text()
        recs.update(json.loads(text[text.index(",") + 1:text.rindex(")")]))
    shares = [(r["share_ambiguous"], r["share_unambiguous"]) for r in recs.values() if r["freq_prompt"] > 0]
    assert shares and all(0 <= a <= 1 and 0 <= u <= 1 and a + u <= 1 + 1e-9 for a, u in shares)
    assert any(abs(a + u - 1) < 1e-9 for a, u in shares)
    assert "rivalry/layer_2/paper" in index.read_text()


def test_select_by_rivalry_group_finds_the_store_it_was_opened_from(rivalry_lake):
    """ds.qsae.select(group=...) reads the rivalry groups beside the store the dataset came from."""
    tmp, cfg, _ = rivalry_lake
    ds = open_lake(cfg.store)
    mine = ds.qsae.select(group="ambiguous", rivalry="rivalry/layer_2/paper")
    explicit = ds.qsae.select(group="ambiguous", rivalry="rivalry/layer_2/paper", store=cfg.store)
    assert 0 < mine.sizes["question"] == explicit.sizes["question"] < ds.sizes["question"]
    with pytest.raises(ValueError, match="name the result"):
        ds.qsae.select(group="ambiguous")  # two layers: which result is ambiguous
    one = open_lake(cfg.store).isel(layer=[1])
    assert one.qsae.select(group="ambiguous").sizes["question"] == mine.sizes["question"]
    # the questions in neither group are a group with a name too, and the three cover the lake
    sizes = {g: one.qsae.select(group=g).sizes["question"] for g in ("ambiguous", "unambiguous", "left_out")}
    assert sum(sizes.values()) == ds.sizes["question"]
    stored = set(open_lake(cfg.store, group="rivalry/layer_2/paper").group.values)
    assert "" not in stored and stored <= {"ambiguous", "unambiguous", "left_out"}
    with pytest.raises(ValueError, match="one of ambiguous, unambiguous, left_out"):
        one.qsae.select(group="")
    # three entropies, named apart: the groups' (here the exact one), the lake's, the tables'
    assert open_lake(cfg.store, group="rivalry/layer_2/paper").entropy.attrs["long_name"] == \
        "exact first-token entropy (nats)"
    top = ds.qsae.top_questions_with_samples(int(ds.codes_idx.isel(layer=1).values.flat[0]), layer=2, n=1)
    assert "first_token_entropy" in top.columns and "entropy" not in top.columns


def test_pipeline_returns_its_own_result_with_the_per_question_protocol(flow_lake):
    """Once a KeyError: 'calibrated' after all the work: the pipeline read the paper protocol's
    dict key from every protocol's summary. It now reads each layer's typed test."""
    from flows.pipeline import pipeline_flow
    from qsae.jobs.pipeline import PipelineResult

    tmp, cfg = flow_lake  # captured: the pipeline's capture stage resumes to nothing
    store = {"store": cfg.store}
    out = pipeline_flow(config=cfg, rivalry=RivalryConfig(protocol="per_question", n_perm=9, n_boot=0, **store),
                        reconstruction=ReconstructionConfig(**store))
    assert isinstance(out, PipelineResult) and out.rivalry.protocol == "per_question"
    assert out.rivalry.group == "rivalry/per_question" and sorted(out.rivalry.layers) == [1, 2]
    assert all(r.test.n_perm == 9 for r in out.rivalry.layers.values())
    art = prefect_artifacts("qsae-pipeline")[0].data
    assert "per_question protocol" in art and "one-sided p by layer 1:" in art
    assert json.loads(out.to_json())["rivalry"]["protocol"] == "per_question"
    assert QuestionLake.open(cfg.store).attrs["last_pipeline"] == {"captures": []}
