"""Faults with real processes and signals: SIGKILL mid-shard, task retry, S3 outage, overlap."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from qsae.jobs.capture import CaptureConfig
from qsae.jobs.verify import verify
from qsae.lake.store import QuestionLake, open_lake

REPO = Path(__file__).resolve().parents[2]
QSAE = str(Path(sys.executable).parent / "qsae")


def qsae_with_fault(spec: str) -> list[str]:
    """The qsae CLI in a process with a fault hook installed (see tests/fault_inject.py)."""
    return [sys.executable, "-m", "tests.fault_inject", spec, "--"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fault_setup(tmp_path_factory, captured):
    cfg = captured()
    return tmp_path_factory.mktemp("faults"), cfg, open_lake(cfg.store).load()


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _config_file(tmp: Path, cfg: CaptureConfig, name: str, **update) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_copy(update=update).model_dump(mode="json")))
    return path


def assert_same_lake(url, ref, storage_options=None):
    got = open_lake(url, storage_options=storage_options).load()
    for name in ref.data_vars:
        np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=name)


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"capture exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the fault point")


def test_sigkill_mid_shard_then_resume_equals_uninterrupted(fault_setup):
    tmp, cfg, ref = fault_setup
    store = str(tmp / "killed.zarr")
    conf = _config_file(tmp, cfg, "killed", store=store)
    marker = tmp / "kill.marker"
    # Pause on the 2nd shard after its data is written and before it is marked done; kill there.
    proc = subprocess.Popen([*qsae_with_fault(f"pause:{marker}:1"), "capture", "--no-prefect", "-c", str(conf)],
                            cwd=REPO, text=True, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_lines(marker, 2, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    lake = QuestionLake.open(store)
    done = lake.done_mask()
    assert done[:2].all() and not done[2:].any()  # shard 1's data is on disk but it is not done
    half = lake.arrays["resid"][0, 2]  # the killed shard's data really was written
    assert np.isfinite(half).all()
    report = verify(store)
    assert report.ok, report.text()  # no question marked done without its data
    assert lake.pending_shards() == [1, 2, 3]
    out = subprocess.run([QSAE, "capture", "--no-prefect", "-c", str(conf)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "3 of 4 shards to capture" in out.stdout  # the job's log lines are the CLI's output
    assert_same_lake(store, ref)


def test_task_failing_once_is_retried_to_the_same_lake(fault_setup, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.capture import capture_flow

    tmp, cfg, ref = fault_setup
    marker = tmp / "raise.marker"
    from qsae.lake.store import BEFORE_DONE

    from ..fault_inject import raise_once

    store = str(tmp / "retried.zarr")
    remove = BEFORE_DONE.install(raise_once(str(marker)))
    try:
        result = capture_flow(config=cfg.model_copy(update={"store": store}), shards_per_task=4)
    finally:
        remove()
    assert marker.exists() and result.done == 8
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="capture-shards")))
    assert max(r.run_count for r in runs) == 2  # failed once, then retried
    assert_same_lake(store, ref)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_outage_fails_clearly_and_resumes(fault_setup, tmp_path):
    import boto3

    tmp, cfg, ref = fault_setup
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    opts = {"key": "test", "secret": "test", "endpoint_url": endpoint,
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 2, "read_timeout": 2, "retries": {"max_attempts": 1}}}
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="outage")
                break
            except Exception:
                time.sleep(0.1)
        store = "s3://outage/lake.zarr"
        conf = _config_file(tmp_path, cfg, "outage", store=store, storage_options=opts)
        marker = tmp_path / "outage.marker"
        # The writer pauses 5 s between shard 1's data and its done flag; S3 goes down then.
        proc = subprocess.Popen([*qsae_with_fault(f"pause:{marker}:1:5"), "capture", "--no-prefect", "-c", str(conf)],
                                cwd=REPO, text=True, env=_env(QSAE_WRITE_TIMEOUT_S="10"),
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_lines(marker, 2, proc)
            os.kill(server.pid, signal.SIGSTOP)  # the S3 server stops answering mid-run
            output, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # The run fails, with an error naming the problem, after bounded retries.
        assert proc.returncode != 0
        assert proc.returncode == 2  # a StoreUnreachableError (qsae's own), re-raised as it was
        assert "qsae: error: writing" in output and "timed out after 10 s" in output, output[-3000:]
        os.kill(server.pid, signal.SIGCONT)  # the server is back
        report = verify(store, storage_options=opts)
        assert report.ok, report.text()
        assert QuestionLake.open(store, storage_options=opts).done_mask().sum() == 2
        again = subprocess.run([QSAE, "capture", "--no-prefect", "-c", str(conf)], cwd=REPO, env=_env(),
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert_same_lake(store, ref, storage_options=opts)
    finally:
        os.kill(server.pid, signal.SIGCONT)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def test_two_workers_on_overlapping_shards_are_harmless(fault_setup):
    tmp, cfg, ref = fault_setup
    store = str(tmp / "overlap.zarr")
    # Create the store first (a run that fails after shard 0's data), so that the two
    # concurrent workers below both resume it rather than race to create it.
    conf = _config_file(tmp, cfg, "overlap", store=store)
    first = subprocess.run([*qsae_with_fault(f"raise-once:{tmp / 'o.marker'}"), "capture", "--no-prefect", "-c",
                            str(conf), "--set", "limit=8", "--set", "questions_per_batch=2"], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode != 0  # leaves the store created with shard 0 written, nothing done
    procs = [subprocess.Popen([QSAE, "capture", "--no-prefect", "-c", str(conf)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[0][-2000:] for o in outs]
    # Both wrote every pending shard, whole and aligned: identical bytes, nothing interleaved.
    assert verify(store).ok
    assert_same_lake(store, ref)


def test_losing_the_prefect_server_mid_shard_ends_in_one_line_and_resumes(fault_setup):
    """The temporary Prefect server is killed while a shard is written but not yet marked done:
    that shard finishes, no other starts, the command ends within 30 s with one line and exit
    status 3 (it once took ~4 minutes and ended in a 376-line httpx traceback), and the same
    command resumes to a lake equal to an uninterrupted one."""
    import re
    import threading

    tmp, cfg, ref = fault_setup
    store = str(tmp / "server-lost.zarr")
    conf = _config_file(tmp, cfg, "server-lost", store=store, questions_per_shard=2, questions_per_chunk=2)
    marker = tmp / "server-lost.marker"
    env = _env(PREFECT_HOME=str(tmp / "prefect-home-lost"))
    env.pop("PREFECT_API_URL", None)
    # Pause 6 s on the 2nd of 4 shards, after its data is written and before it is marked done.
    proc = subprocess.Popen([*qsae_with_fault(f"pause:{marker}:1:6"), "capture", "-c", str(conf),
                             "--shards-per-task", "1"], cwd=REPO, text=True, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        _wait_lines(marker, 2, proc, timeout=300)
        port = next(m.group(1) for line in list(out) if (m := re.search(r"qsae-server-(\d+)\.log", line)))
        pids = subprocess.run(["pgrep", "-f", "--", f"server start --host 127.0.0.1 --port {port}"],
                              capture_output=True, text=True).stdout.split()
        assert pids, out
        for pid in pids:
            os.killpg(int(pid), signal.SIGKILL)
        t0 = time.monotonic()
        err = proc.stderr.read()
        proc.wait(timeout=60)
        ended = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=10)
    assert proc.returncode == 3, err[-3000:]
    assert ended < 30, ended
    lines = err.strip().splitlines()
    assert lines[-1] == ("qsae: the Prefect server stopped; the lake holds 4 of 8 questions; rerun the same "
                         "command to resume"), err[-3000:]
    assert "Traceback" not in err and "ConnectError" not in err, err[-3000:]
    done = QuestionLake.open(store).done_mask()
    per_shard = done.reshape(4, 2)
    assert done.sum() == 4 and (per_shard.all(1) | ~per_shard.any(1)).all()  # the paused one finished; no other started
    assert verify(store).ok
    again = subprocess.run([QSAE, "capture", "-c", str(conf), "--shards-per-task", "1"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert_same_lake(store, ref)
