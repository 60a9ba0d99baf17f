"""Datasets as researchers have them (string ids), and user errors that read like a sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qsae.errors import DatasetError
from qsae.lm.datasets import derive_question_id, load_questions

from ..helpers import tiny_capture, write_sae_folder

REPO = Path(__file__).resolve().parents[2]
QSAE = str(Path(sys.executable).parent / "qsae")
HEADER = "id\tsubj\tprop\tobj\tquestion\tpossible_answers"


def _tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def _string_id_rows(n: int) -> list[str]:
    """PopQA rows with ids as in the HippoRAG / T2RAG copies: popqa_0, popqa_5, ..."""
    people = ["George Rankin", "John Mayne", "Henry Feilden", "Kathy Saltzman", "Eric Bernard", "Ida Rhodes",
              "Carl Linde", "Mary Ann Evans", "Ole Bull", "Vera Brittain"]
    return [f"popqa_{5 * i}\t{people[i % 10]}\toccupation\tpolitician\tWhat is {people[i % 10]}'s occupation?\t"
            + json.dumps(["politician", "statesman"]) for i in range(n)]


def test_string_ids_load_with_stable_derived_question_numbers(tmp_path):
    qs = load_questions(str(_tsv(tmp_path / "popqa.tsv", _string_id_rows(6))))
    assert not qs.problems
    assert qs.dataset_ids() == [f"popqa_{5 * i}" for i in range(6)]
    assert qs.ids() == [derive_question_id(f"popqa_{5 * i}") for i in range(6)]
    assert len(set(qs.ids())) == 6 and all(0 <= i < 2**63 for i in qs.ids())
    # Stable whatever the order or subset: the same id gets the same number.
    rows = _string_id_rows(6)
    again = load_questions(str(_tsv(tmp_path / "shuffled.tsv", [rows[4], rows[1]])))
    assert again.ids() == [qs.ids()[4], qs.ids()[1]]
    # Integer ids are untouched (the lake contract as before).
    ints = load_questions(str(_tsv(tmp_path / "ints.tsv", [r.replace("popqa_", "", 1) for r in rows])))
    assert ints.ids() == [5 * i for i in range(6)] and ints.dataset_ids() is None


def test_duplicate_string_ids_stay_an_error(tmp_path):
    rows = _string_id_rows(3)
    path = _tsv(tmp_path / "dup.tsv", rows + [rows[1]])
    qs = load_questions(str(path))
    assert len(qs) == 3 and [str(p) for p in qs.problems] == ["row 4 (id popqa_5): duplicate id"]
    with pytest.raises(DatasetError, match="duplicate id"):
        load_questions(str(path), on_error="raise")


def test_an_all_bad_file_lists_its_reasons_with_row_numbers(tmp_path):
    rows = [f"{i}\ts\tp\to\tWho is {i}?\tnot json" for i in range(3)] + ["7\ts\tp\to\t\t[\"x\"]"] * 2 + ["8\tshort"] * 3
    with pytest.raises(DatasetError) as err:
        load_questions(str(_tsv(tmp_path / "bad.tsv", rows)))
    msg = str(err.value)
    assert "no usable questions (8 malformed rows)" in msg
    assert "row 1 (id 0): unparsable answers" in msg
    assert "row 4 (id 7): missing or empty question" in msg
    assert "... and 3 more" in msg


def test_a_string_id_tsv_captures_and_is_selectable_by_its_own_ids(tiny_qwen_dir, tmp_path):
    from qsae.jobs.capture import run_capture
    from qsae.lake.store import open_lake

    path = _tsv(tmp_path / "popqa.tsv", _string_id_rows(4))
    cfg = tiny_capture(tiny_qwen_dir, None, tmp_path / "lake.zarr", layers=(1,), dataset=str(path), limit=None)
    run_capture(cfg)
    ds = open_lake(cfg.store)
    assert list(ds.dataset_id.values) == ["popqa_0", "popqa_5", "popqa_10", "popqa_15"]
    assert list(ds.question.values) == [derive_question_id(f"popqa_{5 * i}") for i in range(4)]
    assert bool(ds.done.all())
    one = ds.qsae.select(dataset_ids=["popqa_10"])
    assert list(one.dataset_id.values) == ["popqa_10"] and "Mayne" not in str(one.question_text.values[0])
    with pytest.raises(KeyError, match="popqa_99"):
        ds.qsae.select(dataset_ids=["popqa_99"])
    # Resume: the same file reopens the same lake (identity includes the string ids).
    run_capture(cfg)


def _cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QSAE_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", **(env_extra or {}))
    return subprocess.run([QSAE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _assert_short(out: subprocess.CompletedProcess, first: str) -> None:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and "╭" not in out.stderr, out.stderr
    start = next(i for i, line in enumerate(lines) if line.startswith("qsae: error: "))  # after any progress bars
    assert first in lines[start], out.stderr
    assert len(lines) - start <= 9, out.stderr  # the reason and a hint, a few listed rows at most


def _main(capsys, *args: str) -> subprocess.CompletedProcess:
    """The console entry point run in-process (as the `qsae` script calls it), its exit and stderr."""
    from flows.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), done.value.code, captured.out, captured.err)


@pytest.mark.slow
def test_cli_prints_user_errors_short_with_exit_status_2(tmp_path, tiny_qwen_dir, capsys, monkeypatch):
    monkeypatch.delenv("QSAE_DEBUG", raising=False)
    bad = _tsv(tmp_path / "bad.tsv", [f"{i}\ts\tp\to\tWho?\tnot json" for i in range(7)])
    # The real console script once, in a subprocess: what a user's terminal shows.
    out = _cli("capture", "--no-prefect", "--model", str(tiny_qwen_dir), "--dataset", str(bad),
               "--store", str(tmp_path / "a.zarr"), "--device", "cpu")
    _assert_short(out, "no usable questions (7 malformed rows)")
    assert "row 1 (id 0): unparsable answers" in out.stderr and "... and 2 more" in out.stderr

    out = _main(capsys, "capture", "--no-prefect", "--model", str(tiny_qwen_dir), "--layers", "99",
                "--store", str(tmp_path / "b.zarr"), "--device", "cpu", "--limit", "2")
    _assert_short(out, "99")
    assert not (tmp_path / "b.zarr").exists()

    out = _main(capsys, "inspect", str(tmp_path / "missing.zarr"))
    _assert_short(out, "missing.zarr")

    # no --store: never the demo's lake by default, whatever is there
    out = _main(capsys, "capture", "--no-prefect", "--model", str(tiny_qwen_dir), "--device", "cpu", "--limit", "2")
    _assert_short(out, "name the lake to write with --store PATH")
    out = _main(capsys, "collect", "--no-prefect", "--model", str(tiny_qwen_dir), "--layers", "1")
    _assert_short(out, "without it the collection would write into storage/lakes/tokens.zarr")

    # --debug (or QSAE_DEBUG=1) shows the traceback of the same error: the exception escapes.
    from flows.cli import main
    from qsae.errors import StoreUnreachableError

    with pytest.raises(StoreUnreachableError):
        main(["--debug", "inspect", str(tmp_path / "missing.zarr")])
    monkeypatch.setenv("QSAE_DEBUG", "1")
    with pytest.raises(StoreUnreachableError):
        main(["inspect", str(tmp_path / "missing.zarr")])


def _errors(text: str) -> list[str]:
    """stderr without the progress bars of loading weights (transformers draws them on stderr)."""
    return [line for line in text.strip().splitlines() if line.startswith(("qsae: error:", "(a ", "  "))]


@pytest.mark.slow
def test_common_mistakes_fail_before_a_server_or_model_starts_and_read_the_same_either_way(
        tmp_path, tiny_qwen_dir, capsys, monkeypatch):
    """The five mistakes of issue 26 (and two more) through Prefect (the default): exit 2, the
    same stderr as --no-prefect, and no Prefect server started (nothing loaded: cheap checks first)."""
    from qsae.jobs.capture import run_capture

    monkeypatch.delenv("QSAE_DEBUG", raising=False)
    sae = write_sae_folder(tmp_path / "sae", 64, 128, [1, 2])
    lake = tmp_path / "lake.zarr"
    run_capture(tiny_capture(tiny_qwen_dir, sae, lake, layers=(1,), limit=2, n_samples=2))
    misspelled = tmp_path / "cols.tsv"
    misspelled.write_text("id\tquestin\tpossible_answers\n1\tWho?\t[\"x\"]\n")
    capture = ["capture", "--model", str(tiny_qwen_dir), "--device", "cpu", "--store", str(tmp_path / "new.zarr")]
    mistakes = {
        "misspelled dataset column": ([*capture, "--dataset", str(misspelled)],
                                      "no question column: expected one of question, prompt, text, input; the rows "
                                      "have id, questin, possible_answers (is 'questin' meant to be 'question'?)"),
        "mistyped --sae folder": ([*capture, "--sae", str(tmp_path / "sea"), "--layers", "1"],
                                  f"SAE source {tmp_path / 'sea'} does not exist (in {tmp_path}:"),
        "an SAE folder without the layer": ([*capture, "--sae", str(sae), "--layers", "3"],
                                            f"{sae} has no SAE for layer 3; it has layers [1, 2]"),
        "a layer the model lacks": ([*capture, "--layers", "99"], "layers [99] out of range:"),
        "mistyped --model": (["capture", "--model", str(tmp_path / "qwen"), "--store", str(tmp_path / "x.zarr")],
                             f"no model folder at {tmp_path / 'qwen'}"),
        "a layer the lake lacks": (["rivalry", str(lake), "--layer", "12"],
                                   f"layer 12 is not in the lake {lake} (layers [1])"),
        "a folder that is not a lake": (["features", str(tmp_path)], "exists but is not a qsae lake"),
    }
    home = tmp_path / "prefect-home"
    for what, (args, reason) in mistakes.items():
        through_prefect = _cli(*args, env_extra={"PREFECT_HOME": str(home), "PREFECT_API_URL": ""})
        _assert_short(through_prefect, reason)
        assert "Prefect server" not in through_prefect.stdout, (what, through_prefect.stdout)
        in_process = _main(capsys, *args, "--no-prefect")
        _assert_short(in_process, reason)
        assert _errors(through_prefect.stderr) == _errors(in_process.stderr), what
        assert len(_errors(in_process.stderr)) <= 3, (what, in_process.stderr)
    assert not list(home.glob("qsae-server-*.log"))  # no temporary server was ever launched


@pytest.mark.slow
def test_a_late_error_through_prefect_is_one_line_per_run_and_the_reason_at_the_end(tmp_path, tiny_qwen_dir):
    """An error only the loaded model can find (prompts over the token budget): the flow and task
    runs fail; Prefect's console says so in one line each (no traceback: the UI's logs keep it),
    on stdout; stderr is the same reason as --no-prefect gives."""
    args = ["capture", "--model", str(tiny_qwen_dir), "--device", "cpu", "--limit", "2", "--layers", "1", "--store",
            str(tmp_path / "c.zarr"), "--set", "on_long_prompt=refuse", "--set", "max_prompt_tokens=2"]
    out = _cli(*args, env_extra={"PREFECT_HOME": str(tmp_path / "home")})
    _assert_short(out, "prompts are longer than 2 tokens")
    assert "Traceback" not in out.stdout, out.stdout[-3000:]
    failed = [line for line in out.stdout.splitlines() if "failed: DatasetError:" in line]
    assert len(failed) == 2 and "Task run 'prepare-store" in failed[0] and "Flow run" in failed[1], out.stdout[-3000:]
    assert all(len(line) < 400 for line in out.stdout.splitlines()), out.stdout[-3000:]
    local = _cli(*args, "--no-prefect")
    assert _errors(out.stderr) == _errors(local.stderr)


def test_bugs_still_show_their_traceback(tmp_path, monkeypatch):
    import qsae.lake.inspect
    from flows.cli import main

    with pytest.raises(SystemExit) as done:  # a user error: exit 2, nothing escapes
        main(["inspect", str(tmp_path / "missing.zarr")])
    assert done.value.code == 2

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(qsae.lake.inspect, "inspect_store", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):  # not turned into a one-liner
        main(["inspect", str(tmp_path / "missing.zarr")])


# ------------------------------------------------ failures that are not qsae's own (issue 28)
def test_a_full_disk_ends_in_one_line_and_keeps_done_shards(tmp_path, tiny_qwen_dir, capsys, monkeypatch):
    import errno

    import zarr

    from qsae.lake.store import QuestionLake

    from ..helpers import write_sae_folder

    monkeypatch.delenv("QSAE_DEBUG", raising=False)
    sae = write_sae_folder(tmp_path / "sae", 64, 128, [1])
    real = zarr.storage.LocalStore.set
    calls = {"n": 0}

    async def fills_up(self, key, value):
        if calls.get("shard0") and "/c/" in key:  # shard 0 fits, then the disk is full
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        out = await real(self, key, value)
        calls["shard0"] = calls.get("shard0") or key == "done/c/0"
        return out

    monkeypatch.setattr(zarr.storage.LocalStore, "set", fills_up)
    store = tmp_path / "full.zarr"
    out = _main(capsys, "capture", "--no-prefect", "--model", str(tiny_qwen_dir), "--sae", str(sae), "--layers", "1",
                "--store", str(store), "--device", "cpu", "--limit", "4", "--set", "questions_per_shard=2",
                "--set", "questions_per_chunk=2", "--set", "n_samples=2", "--set", "max_new_tokens=3",
                "--set", "sae_k=5")
    _assert_short(out, "out of disk space writing")
    assert calls["n"] >= 1 and "the region is not marked done" in out.stderr
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real)
    assert QuestionLake.open(str(store)).pending_shards() == [1]  # shard 0 kept, shard 1 to rewrite


@pytest.mark.slow
def test_a_missing_bucket_and_a_dead_endpoint_are_one_line(s3_server, tmp_path):
    import botocore.exceptions

    from qsae.errors import StoreUnreachableError
    from qsae.lake.store import QuestionLake, _store_error

    from ..helpers import small_spec

    endpoint, opts = s3_server
    with pytest.raises(StoreUnreachableError, match="bucket") as err:
        QuestionLake.open_or_create("s3://no-such-bucket/x.zarr", small_spec(), storage_options=opts)
    assert len(str(err.value).splitlines()) == 1
    with socket_closed_port() as port:
        dead = dict(opts, endpoint_url=f"http://127.0.0.1:{port}",
                    config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}})
        with pytest.raises(StoreUnreachableError, match="cannot reach"):
            QuestionLake.open_or_create("s3://lake/dead.zarr", small_spec(), storage_options=dead)
    # a write that loses the endpoint half-way is typed the same way
    exc = _store_error(botocore.exceptions.EndpointConnectionError(endpoint_url=endpoint), "writing shard 3")
    assert isinstance(exc, StoreUnreachableError) and "writing shard 3 failed, the store is unreachable" in str(exc)


class socket_closed_port:
    """A loopback port nothing listens on."""

    def __enter__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


def test_a_truncated_sae_or_model_file_is_named_in_one_line(tmp_path, tiny_qwen_dir, capsys, monkeypatch):
    import shutil

    from ..helpers import write_sae_folder

    monkeypatch.delenv("QSAE_DEBUG", raising=False)
    sae = write_sae_folder(tmp_path / "sae", 64, 128, [1])
    pt = sae / "layer1.sae.pt"
    pt.write_bytes(pt.read_bytes()[:200])
    out = _main(capsys, "capture", "--no-prefect", "--model", str(tiny_qwen_dir), "--sae", str(sae), "--layers", "1",
                "--store", str(tmp_path / "a.zarr"), "--device", "cpu", "--limit", "2")
    _assert_short(out, f"cannot read {pt}")
    model = tmp_path / "model"
    shutil.copytree(tiny_qwen_dir, model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    out = _main(capsys, "capture", "--no-prefect", "--model", str(model), "--layers", "1",
                "--store", str(tmp_path / "b.zarr"), "--device", "cpu", "--limit", "2")
    _assert_short(out, f"cannot load the model at {model}")


def test_one_non_integer_id_is_said_not_silent(tmp_path, caplog):
    import json as _json
    import logging

    from qsae.lm.datasets import load_questions

    path = tmp_path / "mixed.jsonl"
    rows = [{"id": i, "question": f"Q{i}?", "possible_answers": '["a"]'} for i in range(5)]
    rows[3]["id"] = "x-3"
    path.write_text("\n".join(_json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING, logger="qsae.lm.datasets"):
        qs = load_questions(str(path))
    assert qs.dataset_ids() is not None  # derived ids for every question, as before
    assert "1 of 5 ids are not integers ('x-3')" in caplog.text


@pytest.mark.slow
def test_a_run_through_a_temporary_server_can_be_seen_again_with_qsae_ui(tmp_path, tiny_qwen_dir):
    """The command's last line says how to see its run after its temporary server stopped;
    `qsae ui` serves Prefect's database with the UI pointed at its own API (any port), and the
    run is there, with qsae's own log lines in its logs."""
    import re
    import signal
    import socket
    import time
    import urllib.request

    sae = write_sae_folder(tmp_path / "sae", 64, 128, [1])
    home = {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": ""}
    out = _cli("capture", "--model", str(tiny_qwen_dir), "--sae", str(sae), "--sae-k", "6", "--layers", "1",
               "--limit", "4", "--samples", "3", "--max-new-tokens", "4", "--device", "cpu",
               "--store", str(tmp_path / "lake.zarr"), env_extra=home)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    found = re.search(r"run `qsae ui` and open http://127\.0\.0\.1:4200/runs/flow-run/([0-9a-f-]{36})", last)
    assert found, last
    run_id = found.group(1)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", **home)
    env.pop("PREFECT_API_URL")
    proc = subprocess.Popen([QSAE, "ui", "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("Prefect UI: http://127.0.0.1:" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        api = f"http://127.0.0.1:{port}/api"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:
            assert json.loads(resp.read())["api_url"] == api  # the UI talks to this server, whatever the port
        with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=10) as resp:
            run = json.loads(resp.read())
        assert run["state"]["type"] == "COMPLETED" and run["name"]
        req = urllib.request.Request(f"{api}/logs/filter", data=json.dumps(
            {"logs": {"flow_run_id": {"any_": [run_id]}}}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            logs = json.loads(resp.read())
        assert any(entry["name"].startswith("qsae.") for entry in logs), [e["name"] for e in logs]
    finally:
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 30:
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode is not None
