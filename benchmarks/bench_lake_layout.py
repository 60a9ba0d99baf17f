"""Lake layout benchmark: write throughput vs raw numpy, and bytes read by a random selection.

Writes a lake-shaped store (d_model 2048, 20 samples, k=50, N questions, 1 layer) through
``QuestionLake.write_shard`` and the same bytes with ``numpy.tofile`` + fsync, in the same
run, and prints the ratio. Then reads 1 layer x 100 random questions through xarray over a
store that counts the bytes it returns, against the bytes selected, and compares with a
plain 64-question-chunk layout of the same array.

    .venv/bin/python benchmarks/bench_lake_layout.py [--questions 2048] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from zarr.storage import LocalStore, WrapperStore

from qsae.lake.store import LakeLayout, LakeSpec, QuestionLake

D_MODEL, SAMPLES, K, D_SAE = 2048, 20, 50, 32768


class CountingStore(WrapperStore):
    """A read-only store wrapper that counts the bytes every get returns."""

    def __init__(self, store):
        super().__init__(store)
        self.bytes_read = 0

    async def get(self, key, prototype, byte_range=None):
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            self.bytes_read += len(buf)
        return buf

    async def get_partial_values(self, prototype, key_ranges):
        out = await self._store.get_partial_values(prototype, key_ranges)
        self.bytes_read += sum(len(b) for b in out if b is not None)
        return out


def shard_data(lake: QuestionLake, rng) -> dict[str, np.ndarray]:
    """One shard of realistic data (activations ~N(0,1) in fp16, sorted uint16 indices)."""
    n = lake.layout.questions_per_shard
    data = {}
    for var in lake.variables:
        if var.name == "done":
            continue
        shape = lake.expected_shape(var, n)
        dt = lake.group[var.name].dtype
        if var.name.endswith("codes_idx"):
            rows = int(np.prod(shape[:-1]))
            data[var.name] = np.sort(rng.integers(0, D_SAE, size=(rows, K)), axis=1).reshape(shape).astype(dt)
        elif dt.kind in "TUO":
            data[var.name] = np.full(shape, "a completion of some length")
        elif dt.kind == "b":
            data[var.name] = np.ones(shape, bool)
        elif dt.kind in "iu":
            data[var.name] = rng.integers(0, 100, size=shape).astype(dt)
        else:
            data[var.name] = rng.standard_normal(shape, dtype=np.float32).astype(dt)
    return data


def raw_write_fsync(directory: Path, arrays: dict[str, np.ndarray], tag: str = "") -> float:
    """The baseline: each array's bytes with numpy.tofile + fsync, one file per array; seconds."""
    t = time.perf_counter()
    for name, arr in arrays.items():
        if arr.dtype.kind in "TUO":
            arr = np.char.encode(arr.astype(str), "utf-8")
        with open(directory / f"raw_{name}{tag}", "wb") as f:
            np.ascontiguousarray(arr).tofile(f)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - t


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=2048)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shard", type=int, default=64, help="questions per shard (unit of work)")
    ap.add_argument("--chunk", type=int, default=4, help="questions per inner chunk")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="qsae-bench-"))
    rng = np.random.default_rng(0)
    lineage = dict(model="bench", model_revision="0", hook="resid_post", sae_source="bench", sae_sha256={"20": "x"},
                   dataset="bench", dataset_revision="0", sampling={}, seed=0, prompt_template="")
    spec = LakeSpec(np.arange(args.questions), [20], SAMPLES, D_MODEL, 16, D_SAE, K, "float16",
                    LakeLayout(args.shard, args.chunk), lineage)
    try:
        writer_s, raw_s = [], []
        for rep in range(args.repeats):
            url = root / f"lake{rep}.zarr"
            lake = QuestionLake.open_or_create(str(url), spec, mode="overwrite")
            data = shard_data(lake, rng)
            t = time.perf_counter()
            for shard in range(lake.n_shards):
                lake.write_shard(shard, data)
            writer_s.append(time.perf_counter() - t)
            # Baseline: the same arrays as raw bytes, one file per shard and variable, fsynced.
            raw = root / f"raw{rep}"
            raw.mkdir()
            raw_s.append(sum(raw_write_fsync(raw, data, f".{shard}") for shard in range(lake.n_shards)))
            shutil.rmtree(raw)
        lake_bytes = du(root / "lake0.zarr")
        raw_bytes = sum(a.nbytes for a in data.values() if a.dtype.kind not in "TUO") * lake.n_shards
        w, r = min(writer_s), min(raw_s)
        print(f"questions={args.questions} layer=1 samples={SAMPLES} d_model={D_MODEL} k={K} shard={args.shard}q chunk={args.chunk}q")
        print(f"writer: {raw_bytes / w / 1e6:8.1f} MB/s ({w:.2f} s)   raw numpy+fsync: {raw_bytes / r / 1e6:8.1f} MB/s ({r:.2f} s)")
        print(f"RATIO writer/raw throughput = {r / w:.2f}")
        print(f"on disk: {lake_bytes / 1e6:.1f} MB = {lake_bytes / args.questions / 1e3:.1f} kB per question per layer")

        # Random-selection read cost: 1 layer x 100 random questions of resid.
        pick = np.sort(rng.choice(args.questions, 100, replace=False))
        selected = 100 * SAMPLES * D_MODEL * 2
        counting = CountingStore(LocalStore(root / "lake0.zarr", read_only=True))
        ds = xr.open_zarr(counting, consolidated=True)
        counting.bytes_read = 0
        t = time.perf_counter()
        _ = ds.resid.isel(layer=0, question=pick).values
        sel_s = time.perf_counter() - t
        sharded_read = counting.bytes_read

        plain_url = root / "plain.zarr"
        g = zarr.open_group(plain_url, mode="w")
        plain = g.create_array("resid", shape=(1, args.questions, SAMPLES, D_MODEL), chunks=(1, 64, SAMPLES, D_MODEL),
                               dtype="float16", compressors=None, dimension_names=["layer", "question", "sample", "d_model"])
        plain[:] = zarr.open_group(root / "lake0.zarr")["resid"][:]
        zarr.consolidate_metadata(plain_url)
        counting = CountingStore(LocalStore(plain_url, read_only=True))
        ds_plain = xr.open_zarr(counting, consolidated=True)
        counting.bytes_read = 0
        _ = ds_plain.resid.isel(layer=0, question=pick).values
        plain_read = counting.bytes_read

        t = time.perf_counter()
        total = ds.resid.isel(layer=0).astype("float32").sum().compute()
        scan_s = time.perf_counter() - t
        resid_bytes = args.questions * SAMPLES * D_MODEL * 2
        print(f"100 random questions, 1 layer: selected {selected / 1e6:.1f} MB, read {sharded_read / 1e6:.1f} MB "
              f"(RATIO read/selected = {sharded_read / selected:.2f}, {sel_s:.2f} s); "
              f"plain 64-question chunks read {plain_read / 1e6:.1f} MB (RATIO {plain_read / selected:.2f})")
        ds_shards = xr.open_zarr(root / "lake0.zarr", consolidated=True, chunks={"question": args.shard})
        t = time.perf_counter()
        ds_shards.resid.isel(layer=0).astype("float32").sum().compute()
        scan_shard_s = time.perf_counter() - t
        print(f"full scan of resid through xarray/dask: {resid_bytes / scan_s / 1e6:.0f} MB/s with the default "
              f"dask chunks (= inner chunks), {resid_bytes / scan_shard_s / 1e6:.0f} MB/s with chunks={{'question': "
              f"{args.shard}}} (checksum {float(total):.3g})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
