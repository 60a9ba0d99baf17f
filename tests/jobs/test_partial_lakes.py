"""Results that prove themselves (issue 34): a lake with nothing done, a partial lake, a stale or
damaged or vanished result group, hostile metadata. Each case once crashed or answered silently;
each must end in one line naming the problem, or in a result that says what it left out."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from qsae.errors import ResultDamagedError, ResultMissingError, SchemaError, StaleResultError
from qsae.jobs.configs import FeaturesConfig, RivalryConfig
from qsae.jobs.features import run_features
from qsae.jobs.rivalry import run_rivalry
from qsae.jobs.verify import verify
from qsae.lake.store import QuestionLake, consolidate, open_lake

from ..helpers import random_shard, synthetic_lake

N, SHARD = 64, 16


def synthetic(url: str, shards: list[int]) -> str:
    """A question lake of 64 questions (4 shards of 16) with random codes, the given shards done."""
    return synthetic_lake(url, N, shard=SHARD, shards=shards)


def rivalry(url: str):
    return run_rivalry(RivalryConfig(store=url, n_perm=9, n_boot=0, correctness=False, min_group=2, replicates=1,
                                     rule="median"))


def _main(capsys, *args: str) -> tuple[int, str, str]:
    from flows.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(list(args))
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_a_lake_with_nothing_done_is_one_line_for_every_analysis(tmp_path, capsys):
    """A capture 20 s in, or a lost `done` object: once an IndexError deep in features and rivalry."""
    url = synthetic(str(tmp_path / "empty.zarr"), [])
    for cmd in (["rivalry", url, "--set", "correctness=false"], ["features", url], ["reconstruct", url]):
        code, _, err = _main(capsys, *cmd, "--no-prefect")
        lines = [line for line in err.strip().splitlines() if line.startswith("qsae: error")]
        assert code == 2 and len(lines) == 1, (cmd, err)
        assert "holds no captured question yet (0 of 64 done)" in lines[0] and "Traceback" not in err


def test_a_partial_lake_says_what_it_left_out(tmp_path):
    url = synthetic(str(tmp_path / "half.zarr"), [0, 2])
    line = "32 of 64 questions captured; the rest are not in this result"
    res = rivalry(url)
    g = res.summary["groups"]
    assert g["not_captured"] == 32 and g["ambiguous"]["n"] + g["unambiguous"]["n"] + g["left_out"] == 32
    assert line in res.to_text() and line in res.to_markdown()
    per = open_lake(url, group="rivalry/layer_3/paper").load()
    assert (per.group.values == "not_captured").sum() == 32 and np.isnan(per.entropy.values[16:32]).all()
    assert per.attrs["lake_state"]["n_done"] == 32 and per.attrs["summary"]["groups"]["captured"]["note"] == line
    feats = run_features(FeaturesConfig(store=url, logit_effects=False))
    assert feats.captured == line and line in feats.to_text() and line in feats.to_markdown()
    assert json.loads(feats.to_json())["captured"] == line


def test_result_groups_are_refused_when_stale_damaged_or_gone(tmp_path):
    url = synthetic(str(tmp_path / "lake.zarr"), [0, 1])
    rivalry(url)  # computed on 32 of 64 questions
    ds = open_lake(url)
    assert len(ds.qsae.select(group="ambiguous").question) > 0  # fresh: read
    lake = QuestionLake.open(url, mode="r+")
    for s in (2, 3):  # the capture goes on
        lake.write_shard(s, random_shard(lake, s))
    ds = open_lake(url)
    with pytest.raises(StaleResultError, match="computed when 32 of 64 questions were captured; the lake now has 64"):
        ds.qsae.select(group="ambiguous")
    feats = run_features(FeaturesConfig(store=url, logit_effects=False))
    assert any("stale" in c and "rerun `qsae rivalry" in c for c in feats.cautions), feats.cautions
    assert '"rivalry":null' in Path(feats.layers[3]["index"]).read_text()  # no shares from a stale result
    report = verify(url)
    assert report.checks["result_groups"]["rivalry/layer_3/paper"] == "stale"  # said, not failed (the random
    assert any("rivalry/layer_3/paper" in w for w in report.warnings)       # data fails other checks)
    assert not any("rivalry" in p for p in report.problems)

    rivalry(url)  # fresh again; now lose one chunk of the per-question groups
    chunk = Path(url) / "rivalry" / "layer_3" / "paper" / "group" / "c" / "0"
    assert chunk.exists()
    chunk.unlink()
    with pytest.raises(ResultDamagedError, match="group/c/0: missing"):
        open_lake(url).qsae.select(group="ambiguous")
    feats = run_features(FeaturesConfig(store=url, logit_effects=False))
    assert any("damaged" in c for c in feats.cautions)  # once: exit 0 with every share 0.0
    report = verify(url)
    assert report.checks["result_groups"]["rivalry/layer_3/paper"] == "damaged"
    assert any("result group rivalry/layer_3/paper: group/c/0: missing" in p for p in report.problems)

    consolidate(url)  # the consolidated metadata lists rivalry/ ...
    shutil.rmtree(Path(url) / "rivalry")  # ... which is then removed: once a raw "cannot reindex"
    with pytest.raises(ResultMissingError, match="has no result group 'rivalry/layer_3/paper': rerun `qsae rivalry"):
        open_lake(url).qsae.select(group="ambiguous")
    assert run_features(FeaturesConfig(store=url, logit_effects=False)).cautions == []  # none: nothing to say


def _edit_sizes(url: str, n: int) -> None:
    """Hostile metadata: every question-dim array and the config claim ``n`` questions."""
    root = Path(url)
    meta = json.loads((root / "zarr.json").read_text())
    meta["attributes"]["config"]["sizes"]["question"] = n
    (root / "zarr.json").write_text(json.dumps(meta))
    for arr in root.iterdir():
        f = arr / "zarr.json"
        if not f.exists():
            continue
        m = json.loads(f.read_text())
        dims = m.get("dimension_names") or []
        if "question" in dims:
            m["shape"][dims.index("question")] = n
            f.write_text(json.dumps(m))


@pytest.mark.parametrize("n", [10**12, 3 * 10**8])
def test_hostile_sizes_are_refused_before_anything_is_allocated(tmp_path, capsys, n):
    """Once a raw MemoryError (931 GiB) at 10**12, and minutes at 3-4 GB with no output at 3e8."""
    url = synthetic(str(tmp_path / "hostile.zarr"), [0])
    _edit_sizes(url, n)
    for cmd in (["inspect", url], ["rivalry", url, "--no-prefect"]):
        t0 = time.monotonic()
        code, _, err = _main(capsys, *cmd)
        assert code == 2 and f"question = {n}" in err and "beyond any lake qsae writes" in err, err
        assert time.monotonic() - t0 < 30
    report = verify(url)
    assert not report.ok and "beyond any lake qsae writes" in report.problems[0]
    with pytest.raises(SchemaError):
        open_lake(url)


def test_inspect_cuts_long_attributes(tmp_path, capsys):
    url = synthetic(str(tmp_path / "long.zarr"), [0])
    root = Path(url) / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["dataset"] = "x" * 5_000_000
    root.write_text(json.dumps(meta))
    code, out, _ = _main(capsys, "inspect", url)
    assert code in (0, None) and len(out) < 20_000 and "5,000,002 characters; --full prints them" in out
    code, out, _ = _main(capsys, "inspect", url, "--full")
    assert len(out) > 5_000_000
    code, out, _ = _main(capsys, "inspect", url, "--json")
    assert len(out) < 20_000 and json.loads(out)["lineage"]["dataset"].endswith("--full prints them)")


@pytest.mark.slow
def test_the_cli_process_ends_in_one_line_on_hostile_metadata(tmp_path):
    """The real console script, so what a user's terminal shows."""
    import sys

    url = synthetic(str(tmp_path / "hostile2.zarr"), [0])
    _edit_sizes(url, 10**12)
    out = subprocess.run([str(Path(sys.executable).parent / "qsae"), "verify", url, "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and not json.loads(out.stdout)["ok"]
