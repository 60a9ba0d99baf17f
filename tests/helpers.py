"""Helpers the test modules share (no test module imports another): small synthetic lakes,
synthetic activations, tiny SAE files and captures, Prefect artifacts. torch is imported
lazily, so torch-free tests stay torch-free."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qsae.lake.store import LakeLayout, LakeSpec, QuestionLake, TokenLake, TokenLakeSpec

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

LINEAGE = dict(
    model="test-model", model_revision="r0", hook="resid_post", sae_source="test-sae",
    sae_sha256={"3": "aa", "5": "bb"}, dataset="synthetic", dataset_revision="v0",
    sampling={"temperature": 1.0, "top_p": 0.9}, seed=0, prompt_template="Q: {question}\nA:",
)


def small_spec(n_questions=70, layers=(3, 5), n_samples=4, d_model=8, d_sae=300, k=3, **kw) -> LakeSpec:
    lineage = dict(LINEAGE, **kw.pop("lineage", {}))
    return LakeSpec(
        question_ids=np.arange(n_questions) * 3 + 100, layers=list(layers), n_samples=n_samples,
        d_model=d_model, max_new_tokens=5, d_sae=d_sae, k=k,
        layout=kw.pop("layout", LakeLayout(16, 4)), lineage=lineage, **kw,
    )


def random_shard(lake: QuestionLake, shard: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Schema-conforming random data for one shard."""
    rng = np.random.default_rng(seed + 1000 * shard)
    region = lake.shard_region(shard)
    n = region.stop - region.start
    data = {}
    extra = np.random.default_rng(seed + 1000 * shard + 1)  # optional variables: their own stream, so the
    for var in lake.variables:                              # others equal what older code drew
        if var.name == "done":
            continue
        if var.optional:
            shape, dt = lake.expected_shape(var, n), lake.group[var.name].dtype
            if dt.kind in "TUO" or dt.kind in "iu":  # row fields: absent (the dataset had none), as the fill value
                data[var.name] = np.full(shape, var.fill, dtype=object if dt.kind in "TUO" else dt)
            else:
                data[var.name] = extra.standard_normal(shape).astype(dt)
            continue
        shape = lake.expected_shape(var, n)
        dtype = lake.group[var.name].dtype
        if var.name in ("codes_idx", "prompt_codes_idx"):
            d_sae = lake.attrs["d_sae"]
            k = shape[-1]
            flat = np.stack([np.sort(rng.choice(d_sae, k, replace=False)) for _ in range(int(np.prod(shape[:-1])))])
            data[var.name] = flat.reshape(shape).astype(dtype)
        elif var.name == "answers":
            data[var.name] = np.array([json.dumps([f"ans{i}"]) for i in range(n)])
        elif dtype.kind in "TUO":
            data[var.name] = rng.choice(["alpha", "beta", "gamma délta"], size=shape)
        elif dtype.kind == "b":
            data[var.name] = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            data[var.name] = rng.integers(0, 50, size=shape).astype(dtype)
        else:
            data[var.name] = rng.standard_normal(shape).astype(dtype)
    return data


def sparse_dictionary_data(n_tokens=40_000, d_model=32, n_atoms=48, k_true=3, noise=0.01, seed=0):
    """x = sum of k_true random unit atoms with positive magnitudes (+ small noise)."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d_model))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.stack([rng.choice(n_atoms, k_true, replace=False) for _ in range(n_tokens)])
    mags = rng.exponential(1.0, size=(n_tokens, k_true)) + 0.5
    x = np.einsum("nk,nkd->nd", mags, atoms[idx]) + noise * rng.standard_normal((n_tokens, d_model))
    return x.astype(np.float32), atoms


def write_token_lake(url, x, block_tokens=2000, special_every=0, layer=7):
    n, d = x.shape
    lake = TokenLake.open_or_create(url, TokenLakeSpec(
        n_tokens=n, layers=[layer], d_model=d, block_tokens=block_tokens, resid_dtype="float32",
        lineage={"model": "synthetic", "model_revision": "0", "hook": "resid_post", "dataset": "synthetic",
                 "dataset_revision": "0", "context_length": 0, "bos": "none", "tokens_per_window": 0}),
        mode="overwrite")
    special = np.zeros(n, bool)
    if special_every:
        special[::special_every] = True
    for b in range(lake.n_shards):
        r = lake.shard_region(b)
        m = r.stop - r.start
        lake.write_shard(b, {
            "acts": x[None, r], "norm": np.linalg.norm(x[None, r], axis=-1),
            "overflow": np.zeros((1, m), np.uint16), "nonfinite": np.zeros((1, m), np.uint16),
            "token_id": np.zeros(m, np.int32), "doc": np.zeros(m, np.int32),
            "position": np.arange(m, dtype=np.int32), "special": special[r]})
    return TokenLake.open(url)


def qwen_scope_dict(d_model=16, d_sae=64, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_sae, d_model, generator=g),
        "W_dec": torch.randn(d_model, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_model, generator=g) * 0.1,
    }


def write_sae_folder(path, d_model, d_sae, layers, scale=1.0):
    import torch

    path.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        d = qwen_scope_dict(d_model=d_model, d_sae=d_sae, seed=layer)
        d["W_enc"] *= scale / d_model**0.5
        torch.save(d, path / f"layer{layer}.sae.pt")
    return path


def tiny_capture(model_dir, sae, store, layers=(1, 2), **kw) :
    """The small capture on the tiny Qwen3.5 MoE that many tests share (override any field)."""
    from qsae.jobs.capture import CaptureConfig

    base = dict(model=str(model_dir), sae=str(sae) if sae else None, sae_k=6, layers=list(layers), limit=8, n_samples=3,
                max_new_tokens=4, questions_per_shard=2, questions_per_chunk=2, questions_per_batch=2, device="cpu",
                dtype="float32", store=str(store))
    base.update(kw)
    return CaptureConfig(**base)


def prefect_logs(logger: str):
    """The log entries the Prefect API holds from one logger (flushed first)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterName
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(name=LogFilterName(any_=[logger])))


def prefect_artifacts(key: str):
    """Artifacts with a key, newest first, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.CREATED_DESC)


def write_relu_checkpoint(path, d_model, d_sae, seed=0, identity=False):
    """A ReLU SAE in the 9B release's checkpoint format (pre-encoder bias, MLP output). With
    ``identity`` its features are [x, -x] and x_hat == x exactly (d_sae = 2 d_model)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if identity:
        eye = torch.eye(d_model)
        sd = {"bias": torch.zeros(d_model), "encoder.weight": torch.cat([eye, -eye]),
              "encoder.bias": torch.zeros(2 * d_model), "decoder.weight": torch.cat([eye, -eye], 1)}
    else:
        sd = {"bias": torch.randn(d_model, generator=g) * 0.05,
              "encoder.weight": torch.randn(d_sae, d_model, generator=g) / d_model**0.5,
              "encoder.bias": torch.randn(d_sae, generator=g) * 0.1 - 0.2,
              "decoder.weight": torch.randn(d_model, d_sae, generator=g) / d_sae**0.5}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": sd}, path)
    return path


def synthetic_lake(url, n_questions=64, layers=(3,), n_samples=6, d_sae=120, k=8, shard=16, shards=None,
                   codes=None, prompt=None, completions=None, **fields) -> str:
    """The one synthetic question lake of the tests: schema-conforming random data
    (``random_shard``) in shards of ``shard`` questions, ``shards`` of them written and done (all by
    default); ``codes`` (idx, val) of shape (Q, S, k) and ``prompt`` (idx, val) of (Q, k) replace the
    random codes at every layer (``prompt`` defaults to each question's first sample's codes),
    ``completions`` (Q, S) and any (Q,)-shaped question ``fields`` (entropy, relation, ...)
    replace theirs."""
    spec = small_spec(n_questions=n_questions, layers=layers, n_samples=n_samples, d_sae=d_sae, k=k,
                      layout=LakeLayout(shard, 4), lineage={"sae_sha256": {str(x): "x" for x in layers}})
    lake = QuestionLake.open_or_create(str(url), spec, mode="overwrite")
    L = len(layers)
    for s in range(lake.n_shards) if shards is None else shards:
        r = lake.shard_region(s)
        data = random_shard(lake, s)
        if codes is not None:
            idx, val = codes
            pi, pv = prompt if prompt is not None else (idx[:, 0], val[:, 0])
            data["codes_idx"] = np.repeat(idx[None, r], L, 0).astype(np.uint16)
            data["codes_val"] = np.repeat(val[None, r], L, 0)
            data["prompt_codes_idx"] = np.repeat(pi[None, r], L, 0).astype(np.uint16)
            data["prompt_codes_val"] = np.repeat(pv[None, r], L, 0)
        if completions is not None:
            data["completion"] = completions[r]
        for name, value in fields.items():
            if value is not None:
                data[name] = value[r]
        lake.write_shard(s, data)
    return lake.url
