"""``--json`` prints JSON alone on stdout, for every command that has it, through Prefect (the
default) and in-process; what a person reads (Prefect's console, progress, the run's link) goes
to stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import write_sae_folder

REPO = Path(__file__).resolve().parents[2]
QSAE = str(Path(sys.executable).parent / "qsae")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """One temporary Prefect server for the module's commands (PREFECT_API_URL in their env)."""
    from flows.server import TemporaryServer

    home = tmp_path_factory.mktemp("prefect-home")
    os.environ.setdefault("PREFECT_HOME", str(home))
    server = TemporaryServer(ui=False, log_path=home / "server.log")
    server.start()
    try:
        yield server.api_url
    finally:
        server.stop()


def _json(api: str | None, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("QSAE_DEBUG", "PREFECT_API_URL")}
    env.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api:
        env["PREFECT_API_URL"] = api
    out = subprocess.run([QSAE, *args, "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    try:
        doc = json.loads(out.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{args[0]} --json: stdout is not JSON alone ({e}):\n{out.stdout[:2000]}") from None
    assert isinstance(doc, dict) and doc, out.stdout[:500]
    return doc


def test_every_json_output_is_json_alone(api, tmp_path, tiny_qwen_dir):
    sae = write_sae_folder(tmp_path / "sae", 64, 128, [1])
    lake = str(tmp_path / "lake.zarr")
    cap = _json(api, "capture", "--model", str(tiny_qwen_dir), "--sae", str(sae), "--sae-k", "6", "--layers", "1",
                "--limit", "8", "--samples", "3", "--max-new-tokens", "4", "--device", "cpu", "--store", lake)
    assert cap["done"] == 8
    riv = _json(api, "rivalry", lake, "--n-perm", "9", "--set", "n_boot=0", "--set", "min_group=2")
    assert "calibrated" in riv["by_layer"]["1"] and riv["protocol"] == "paper"
    assert _json(api, "reconstruct", lake)["group"] == "reconstruction"
    assert _json(api, "features", lake)
    assert _json(api, "compare", "--base-sae", str(sae), "--finetuned-sae", str(sae), "--layer", "1")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"The river number {i} runs into the sea near a small town." for i in range(40)))
    tokens = str(tmp_path / "tokens.zarr")
    assert _json(api, "collect", "--model", str(tiny_qwen_dir), "--dataset", str(text), "--layers", "1",
                 "--store", tokens, "--max-tokens", "600", "--set", "device=cpu", "--set", "context_length=32")
    assert _json(api, "train", "--store", tokens, "--layer", "1", "--k", "4", "--out", str(tmp_path / "trained"),
                 "--set", "batch_size=64", "--set", "d_sae=128")
    for command in ("rivalry", "reconstruct", "features"):  # in-process, with progress bars on stderr
        assert _json(None, command, lake, "--no-prefect", *(["--n-perm", "9", "--set", "n_boot=0", "--set",
                                                              "min_group=2"] if command == "rivalry" else []))
    assert _json(None, "verify", lake)["ok"] is True
    assert _json(None, "inspect", lake)["dims"]["question"] == 8
