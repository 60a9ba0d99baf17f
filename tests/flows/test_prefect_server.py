"""The temporary Prefect API that commands start when none is configured (flows/server.py).

A first ``./run.sh demo`` once failed because Prefect's own ephemeral server gave up after
20 s on a busy 2-core machine with a fresh database. These tests start the real server with
a fresh ``PREFECT_HOME`` while CPU hogs keep every core busy, and check the failure paths
say what happened and name the server's log.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..helpers import random_shard, small_spec

REPO = Path(__file__).resolve().parents[2]
QSAE = str(Path(sys.executable).parent / "qsae")



pytestmark = pytest.mark.slow  # every test here starts or stops a server process

def _spin(deadline: float) -> None:
    x = 0
    while time.time() < deadline:
        x += 1


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", **extra)
    return env


@pytest.fixture
def complete_lake(tmp_path) -> str:
    from qsae.lake.store import QuestionLake

    url = str(tmp_path / "lake.zarr")
    lake = QuestionLake.open_or_create(url, small_spec(n_questions=32, layers=(3,)), mode="create")
    for shard in range(lake.n_shards):
        lake.write_shard(shard, random_shard(lake, shard))
    return url


@pytest.mark.slow
def test_a_command_runs_its_flow_on_a_busy_machine_with_a_fresh_database(tmp_path, complete_lake):
    """`qsae rivalry` through Prefect with no API configured, a new database and all cores busy."""
    n_hogs = os.cpu_count() or 2  # every core busy
    deadline = time.time() + 240
    hogs = [mp.get_context("spawn").Process(target=_spin, args=(deadline,), daemon=True) for _ in range(n_hogs)]
    for h in hogs:
        h.start()
    try:
        t0 = time.monotonic()
        out = subprocess.run([QSAE, "rivalry", complete_lake, "--layer", "3", "--n-perm", "99"], cwd=REPO, env=_env(tmp_path / "home"),
                             capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - t0
    finally:
        for h in hogs:
            h.terminate()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "starting a temporary Prefect server" in out.stdout
    assert "Prefect API up " in out.stdout
    assert "results:" in out.stdout
    assert (tmp_path / "home" / "prefect.db").exists()  # the database was created fresh, here
    print(f"busy machine ({n_hogs} hogs): command took {seconds:.1f} s;",
          next(line for line in out.stdout.splitlines() if "Prefect API up " in line))
    # The server is gone once the command ends: nothing listens on its port any more.
    port = int(next(line for line in out.stdout.splitlines() if "Prefect API up " in line).rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_server_that_exits_is_reported_with_its_log(tmp_path, monkeypatch):
    from flows.server import PrefectServerError, TemporaryServer

    with socket.socket() as busy:  # the port is taken, so the server exits at start
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
        server = TemporaryServer(port=port, log_path=tmp_path / "server.log")
        with pytest.raises(PrefectServerError) as err:
            server.start(timeout=300)
    msg = str(err.value)
    assert "exited with status" in msg and str(tmp_path / "server.log") in msg
    assert (tmp_path / "server.log").read_text().strip()  # the log holds the server's own words
    assert server.proc is not None and server.proc.poll() is not None


def test_a_server_that_never_answers_times_out_clearly_and_is_stopped(tmp_path, monkeypatch):
    from flows.server import START_TIMEOUT_ENV, PrefectServerError, TemporaryServer

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    server = TemporaryServer(log_path=tmp_path / "server.log")
    with pytest.raises(PrefectServerError) as err:
        server.start(timeout=0.2)
    msg = str(err.value)
    assert "did not answer" in msg and START_TIMEOUT_ENV in msg and str(tmp_path / "server.log") in msg
    assert server.proc is not None and server.proc.poll() is not None  # not left running


def test_a_configured_api_is_used_and_nothing_is_started():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import prefect_api

    said: list[str] = []
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with prefect_api(said.append) as url:
            assert url == "http://127.0.0.1:9/api"
    assert said == []


def test_the_cli_prints_a_server_failure_as_a_short_error(tmp_path):
    """An impossible start (timeout 0) reaches the user as two plain lines and exit status 2."""
    from qsae.lake.store import QuestionLake

    lake = QuestionLake.open_or_create(str(tmp_path / "lake.zarr"), small_spec(n_questions=16))
    lake.write_shard(0, random_shard(lake, 0))  # something captured: it passes the checks
    env = _env(tmp_path / "home", QSAE_PREFECT_START_TIMEOUT_S="0")
    out = subprocess.run([QSAE, "rivalry", lake.url], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("qsae: error: the temporary Prefect API server did not answer")
    assert "Traceback" not in out.stderr


def test_the_temporary_servers_ui_talks_to_its_own_api(tmp_path, monkeypatch):
    """The UI reads its API address from /ui-settings; on a free port that must be this
    server's, not the default 127.0.0.1:4200 (the UI then shows "Can't connect")."""
    import json
    import urllib.request

    from flows.server import TemporaryServer

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    server = TemporaryServer(log_path=tmp_path / "server.log")
    try:
        server.start()
        base = server.api_url.removesuffix("/api")
        with urllib.request.urlopen(f"{base}/ui-settings", timeout=30) as r:
            settings = json.load(r)
        assert settings["api_url"] == server.api_url and server.port != 4200
    finally:
        server.stop()
