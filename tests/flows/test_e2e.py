"""End to end as researchers run it: a real Prefect server on loopback, a process work pool with
one queue per "GPU", deployments from prefect.yaml, two workers, the pipeline deployment on a
tiny model with the lake on a local S3 server, compared with a local single-worker run.
Every process started here is stopped by its id."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from ..helpers import write_sae_folder

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Background processes started by this test, each in its own session; stopped by pid."""

    def __init__(self, logdir: Path):
        self.logdir, self.procs = logdir, []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        p = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 20
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def tail(self, name: str, n: int = 3000) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-n:]


def _run(args, env, timeout=180):
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_pipeline_deployment_on_two_workers_with_s3_lake(tmp_path, s3_server, tiny_qwen_dir, cache_dir):
    endpoint, s3_opts = s3_server
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1", PREFECT_CLI_PROMPT="false",
        PREFECT_LOGGING_LEVEL="INFO", QSAE_S3_ENDPOINT=endpoint, AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1", HF_HUB_OFFLINE="1", QSAE_CACHE=str(cache_dir),
        PATH=f"{BIN}:{os.environ.get('PATH', '')}",
    )
    procs = Procs(tmp_path)
    try:
        procs.start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
        import httpx

        for _ in range(240):
            try:
                if httpx.get(f"{api}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("Prefect server did not start:\n" + procs.tail("server"))
        prefect = str(BIN / "prefect")
        # Pool and queues through the Python client (each CLI call is a cold import on a busy
        # machine); the deployments through `prefect deploy` from prefect.yaml's own definitions,
        # both in one call, with their pools renamed to the test's pool.
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                client.create_work_pool(WorkPoolCreate(name="qsae-e2e", type="process"))
                for q in ("gpu-0", "gpu-1"):
                    client.create_work_queue(name=q, work_pool_name="qsae-e2e", concurrency_limit=1)
        spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
        spec["deployments"] = [d for d in spec["deployments"] if d["name"] in ("capture", "pipeline")]
        for d in spec["deployments"]:
            d["work_pool"] = {**d["work_pool"], "name": "qsae-e2e"}
        (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
        _run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml")], env)
        procs.start("worker-1", [prefect, "worker", "start", "--pool", "qsae-e2e", "--work-queue", "default",
                                 "--work-queue", "gpu-0", "--name", "w1"], env)
        procs.start("worker-2", [prefect, "worker", "start", "--pool", "qsae-e2e", "--work-queue", "gpu-1",
                                 "--name", "w2"], env)

        sae = write_sae_folder(tmp_path / "sae", 64, 128, [1, 2])
        capture = dict(model=str(tiny_qwen_dir), sae=str(sae), sae_k=6, layers=[1, 2], limit=8, n_samples=3,
                       max_new_tokens=4, questions_per_shard=2, questions_per_chunk=2, questions_per_batch=2,
                       device="cpu", dtype="float32", store="s3://lake/e2e.zarr")
        from qsae.jobs.capture import CaptureConfig, run_capture

        # as the Prefect API enforces the parameter schema: sampling fields nested
        params = {"config": CaptureConfig(**capture).model_dump(mode="json"), "capture_deployment": "qsae-capture/capture", "gpu_queues": ["gpu-0", "gpu-1"],
                  "shards_per_task": 1, "rivalry": {"store": "", "n_perm": 49, "n_boot": 50}}
        out = subprocess.run([prefect, "deployment", "run", "qsae-pipeline/pipeline", "--params", json.dumps(params),
                              "--watch", "--watch-timeout", "600"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=700)
        logs = "\n".join(f"--- {n}\n{procs.tail(n)}" for n in ("worker-1", "worker-2"))
        assert out.returncode == 0 and "Completed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:] + logs

        # Both workers took shards: the capture runs carry the worker's name label.
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
            FlowRunFilter,
            LogFilter,
            LogFilterFlowRunId,
        )

        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                deps = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["capture"])))
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [deps[0].id]}))
                parents = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id={"any_": [d.id for d in client.read_deployments()
                                            if d.name == "pipeline"]}))
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
        assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
        # The jobs log through stdlib loggers; the deployments forward them to the runs' logs (the UI).
        assert any("questions captured" in entry.message for entry in logs), [e.message for e in logs][:20]
        assert {r.labels.get("prefect.worker.name") for r in runs} == {"w1", "w2"}
        assert sorted(tuple(r.parameters["shards"]) for r in runs) == [(0, 1), (2, 3)]
        assert parents and parents[0].state.is_completed()

        # The lake read from S3 by xarray is complete and equals a local single-worker run.
        remote = xr.open_zarr("s3://lake/e2e.zarr", storage_options=s3_opts).load()
        assert bool(remote.done.all())
        local_cfg = CaptureConfig(**{**capture, "store": str(tmp_path / "local.zarr")})
        run_capture(local_cfg)
        local = xr.open_zarr(local_cfg.store).load()
        for name in local.data_vars:
            np.testing.assert_array_equal(remote[name].values, local[name].values, err_msg=name)
        # The accessor and `qsae inspect` work the same on s3:// as on a local path.
        import qsae  # noqa: F401
        from qsae.lake.inspect import inspect_store

        lazy_remote = xr.open_zarr("s3://lake/e2e.zarr", storage_options=s3_opts)
        np.testing.assert_array_equal(lazy_remote.qsae.firing_frequency().compute().values,
                                      xr.open_zarr(local_cfg.store).qsae.firing_frequency().compute().values)
        info = inspect_store("s3://lake/e2e.zarr", storage_options=s3_opts)
        assert info["done_fraction"] == 1.0 and info["variables"]["resid"]["bytes_on_disk"] > 0
        assert "reconstruction" in info["result_groups"]
        groups = xr.open_zarr("s3://lake/e2e.zarr", storage_options=s3_opts, group="reconstruction")
        assert list(groups.layer.values) == [1, 2]
        riv = xr.open_zarr("s3://lake/e2e.zarr", storage_options=s3_opts, group="rivalry/layer_2/paper")
        assert riv.sizes["question"] == 8
    finally:
        procs.stop_all()
    assert all(p.poll() is not None for _, p in procs.procs)
