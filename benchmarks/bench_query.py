"""Query benchmark: top-N questions for one feature over a full-size lake layer.

``ds.qsae.top_questions`` (sparse: compares the k codes of each row with the feature) against
a naive full densification (each question block scattered into a dense (questions, samples,
32768) float32 array, then the feature's column taken), on a 14,267-question x 20-sample x
k=50 lake, in the same run. Prints the time ratio and the bytes each reads from the store.

    .venv/bin/python benchmarks/bench_query.py [--questions 14267] [--n 10]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from bench_lake_layout import CountingStore
from synthetic_lake import D_SAE, build_code_lake
from zarr.storage import LocalStore

import qsae  # noqa: F401


def naive_top(store, layer_index: int, feature: int, n: int, block: int = 128):
    """Densify block by block (a full dense layer would be 14,267 x 20 x 32,768 x 4 B = 37 GB)."""
    ds = xr.open_zarr(store, consolidated=True)
    idx_arr, val_arr = ds.codes_idx, ds.codes_val
    column = []
    for start in range(0, ds.sizes["question"], block):
        idx = idx_arr.isel(layer=layer_index, question=slice(start, start + block)).values.astype(np.int64)
        val = val_arr.isel(layer=layer_index, question=slice(start, start + block)).values
        dense = np.zeros(idx.shape[:-1] + (D_SAE,), np.float32)
        np.put_along_axis(dense, idx, val, axis=-1)
        column.append(dense[..., feature].copy())  # a view would keep each dense block alive
    flat = np.concatenate(column).reshape(-1)
    top = np.argsort(-flat, kind="stable")[:n]
    return flat[top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=14267)
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qsae-query-"))
    try:
        t = time.perf_counter()
        url = build_code_lake(root, args.questions, "uniform")
        print(f"lake: {args.questions} questions x 20 samples x k=50 over {D_SAE} features "
              f"(built in {time.perf_counter() - t:.0f} s)")
        feature = 1234
        results = {}
        for label, chunks in (("accessor, default chunks", None), ("accessor, shard-sized chunks", {"question": 256})):
            store = CountingStore(LocalStore(url, read_only=True))
            ds = xr.open_zarr(store, consolidated=True, chunks=chunks) if chunks else xr.open_zarr(store, consolidated=True)
            store.bytes_read = 0
            t = time.perf_counter()
            top = ds.qsae.top_questions(feature, layer=20, n=args.n)
            results[label] = (time.perf_counter() - t, store.bytes_read, top.activation.values)
        store = CountingStore(LocalStore(url, read_only=True))
        t = time.perf_counter()
        naive = naive_top(store, 0, feature, args.n)
        naive_s, naive_bytes = time.perf_counter() - t, store.bytes_read
        for label, (sec, nbytes, acts) in results.items():
            assert np.allclose(acts, naive), "accessor and naive answers differ"
            print(f"{label:30s}: {sec:6.2f} s, read {nbytes / 1e6:7.1f} MB")
        print(f"{'naive densification':30s}: {naive_s:6.2f} s, read {naive_bytes / 1e6:7.1f} MB")
        best = min(r[0] for r in results.values())
        print(f"RATIO naive/accessor time = {naive_s / best:.1f}x; bytes read ratio = "
              f"{naive_bytes / min(r[1] for r in results.values()):.2f} (both read only this layer's codes)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
