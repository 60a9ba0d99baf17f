"""Small synthetic lakes for tests that exercise the lake contract without a model."""

from __future__ import annotations

import json

import numpy as np

from qsae.lake.store import LakeLayout, LakeSpec, QuestionLake

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
    for var in lake.variables:
        if var.name == "done":
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
