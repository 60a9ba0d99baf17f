"""The ``ds.qsae`` xarray accessor: ad-hoc queries on a lake, lazy on dask-backed data.

Registered when ``qsae`` is imported. Everything works from the sparse TopK codes; nothing
builds a dense question x d_sae array. Calls return lazy DataArrays where the answer is
array-shaped (compute them with ``.compute()``) and small eager tables where it is a ranking.

    import qsae, xarray as xr
    ds = xr.open_zarr("storage/lakes/demo.zarr")
    ds.qsae.feature_activation([120, 7], layer=15)      # (question, sample, feature), lazy
    ds.qsae.top_questions(120, layer=15, n=10)         # ranking with question text and completions
    ds.qsae.firing_frequency(layer=15)                 # (feature,), lazy
    ds.qsae.select(entropy=(2.0, None), correct="none")
    qsae.reconstruct(ds, layer=15)                     # x_hat from the codes and the lineage's SAE
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import xarray as xr

from qsae.errors import LayerError
from qsae.lake.storage import StoreRef

Which = Literal["completion", "prompt"]


def _codes(ds: xr.Dataset, which: Which) -> tuple[xr.DataArray, xr.DataArray]:
    """The code arrays, with dask blocks of at least one shard of questions.

    ``open_zarr`` makes one dask chunk per 4-question inner chunk (cheap random access);
    a whole-layer query over that many tiny tasks is dominated by scheduling, so the blocks
    are merged to the shard size here (reads stay the same bytes).
    """
    if "codes_idx" not in ds:
        raise ValueError("this lake holds no SAE codes")
    if which == "completion":
        idx, val = ds.codes_idx, ds.codes_val
    elif which == "prompt":
        idx, val = ds.prompt_codes_idx, ds.prompt_codes_val
    else:
        raise ValueError(f"which must be 'completion' or 'prompt', got {which!r}")
    if idx.chunks is not None:
        shard = (ds.codes_idx.encoding.get("shards") or (None, 256))[1] or 256
        if max(idx.chunksizes["question"]) < shard:
            idx, val = idx.chunk({"question": shard}), val.chunk({"question": shard})
    return idx, val


def _activation_of(idx: np.ndarray, val: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(..., k) codes -> (..., F) activation of each requested feature (0 where it is not in the code)."""
    hit = idx[..., None, :].astype(np.int64) == features[:, None]
    return np.where(hit, val[..., None, :], 0).sum(-1).astype(np.float32)


def _block_counts(idx: np.ndarray, val: np.ndarray, d_sae: int, weighted: bool = False) -> np.ndarray:
    """Per-layer firing counts (or, ``weighted``, activation sums) of one (layer, question[,
    sample], k) block -> (layer, 1, d_sae)."""
    out = np.zeros((idx.shape[0], 1, d_sae), dtype=np.float64 if weighted else np.int64)
    for li in range(idx.shape[0]):
        active = val[li] != 0  # Qwen-Scope TopK keeps negative values: active too
        weights = val[li][active].astype(np.float64) if weighted else None
        out[li, 0] = np.bincount(idx[li][active].astype(np.int64), weights, minlength=d_sae)
    return out


def _feature_counts(idx: xr.DataArray, val: xr.DataArray, d_sae: int, weighted: bool = False) -> xr.DataArray:
    """(layer, feature) firing counts (or activation sums), block by block along questions (lazy on dask)."""
    dtype = np.float64 if weighted else np.int64
    if hasattr(idx.data, "dask"):
        import dask.array as da

        i, v = idx.data, val.data.rechunk(idx.data.chunks)
        tail = tuple(range(2, i.ndim))
        blocks = da.map_blocks(_block_counts, i, v, d_sae=d_sae, weighted=weighted, dtype=dtype, drop_axis=tail,
                               new_axis=2, chunks=(i.chunks[0], (1,) * len(i.chunks[1]), (d_sae,)))
        data = blocks.sum(axis=1)
    else:
        data = _block_counts(np.asarray(idx), np.asarray(val), d_sae, weighted)[:, 0]
    return xr.DataArray(data, dims=("layer", "feature"), coords={"layer": idx.layer.values, "feature": np.arange(d_sae)})


@xr.register_dataset_accessor("qsae")
class QsaeAccessor:
    """Queries on a question lake opened with xarray (local or s3://, dask-backed or not)."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    # ------------------------------------------------------------------ activations
    def feature_activation(self, features: int | Sequence[int], layer: int | None = None,
                           which: Which = "completion") -> xr.DataArray:
        """Dense activation of chosen features, decoded from the TopK codes (lazy on dask).

        Dims: (layer, question, sample, feature) for completions, (layer, question, feature)
        for prompts; ``layer`` given drops that dim.
        """
        feats = np.atleast_1d(np.asarray(features, dtype=np.int64))
        d_sae = self._ds.attrs.get("d_sae")
        if d_sae is not None and ((feats < 0) | (feats >= d_sae)).any():
            raise ValueError(f"features must be in 0..{d_sae - 1}")
        idx, val = _codes(self._ds, which)
        if layer is not None:
            have = [int(x) for x in self._ds.layer.values]
            if int(layer) not in have:
                raise LayerError(f"layer {layer} is not in this lake (layers {have})")
            idx, val = idx.sel(layer=layer), val.sel(layer=layer)
        out = xr.apply_ufunc(
            _activation_of, idx, val, kwargs={"features": feats},
            input_core_dims=[["k"], ["k"]], output_core_dims=[["feature"]],
            dask="parallelized", output_dtypes=[np.float32], keep_attrs=False,
            dask_gufunc_kwargs={"output_sizes": {"feature": feats.size}},
        )
        return out.assign_coords(feature=feats).rename("activation")

    def top_questions(self, feature: int, layer: int | None = None, n: int = 10, which: Which = "completion",
                      done_only: bool = True):
        """The N (question, sample) rows where ``feature`` fires most, with their text.

        Reads only that layer's codes (plus the text of the N winners). Returns a pandas
        DataFrame sorted by activation; ``first_token_entropy`` is the lake's ``entropy`` (nats).
        """
        import pandas as pd

        layer = self._layer(layer)
        act = self.feature_activation(feature, layer, which).isel(feature=0)
        if done_only:
            act = act.where(self._ds.done, 0)
        values = np.asarray(act.compute()) if hasattr(act.data, "compute") else np.asarray(act)
        flat = values.reshape(-1)
        n = min(n, int((flat > 0).sum()))
        if n == 0:
            return pd.DataFrame(columns=["question", "sample", "activation", "question_text", "completion",
                                         "first_token_entropy"])
        top = np.argpartition(-flat, n - 1)[:n]
        top = top[np.argsort(-flat[top], kind="stable")]
        rows = []
        S = values.shape[1] if values.ndim == 2 else 1
        for pos in top:
            q, s = (divmod(int(pos), S) if values.ndim == 2 else (int(pos), None))
            row = {"question": int(self._ds.question[q]), "sample": s, "activation": float(flat[pos]),
                   "question_text": str(self._ds.question_text[q].values),
                   "first_token_entropy": float(self._ds.entropy[q])}  # nats, the lake's `entropy`
            if s is not None:
                row["completion"] = str(self._ds.completion[q, s].values)
            rows.append(row)
        return pd.DataFrame(rows)

    def firing_frequency(self, layer: int | None = None, which: Which = "completion", done_only: bool = True) -> xr.DataArray:
        """Fraction of (done) tokens on which each feature fires, per layer (lazy on dask)."""
        return self._per_feature(layer, which, done_only, weighted=False).rename("firing_frequency")

    def mean_activation(self, layer: int | None = None, which: Which = "completion", done_only: bool = True) -> xr.DataArray:
        """Mean activation of each feature over (done) tokens, zeros included, per layer (lazy on dask)."""
        return self._per_feature(layer, which, done_only, weighted=True).rename("mean_activation")

    def _per_feature(self, layer: int | None, which: Which, done_only: bool, weighted: bool) -> xr.DataArray:
        idx, val = _codes(self._ds, which)
        d_sae = int(self._ds.attrs["d_sae"])
        done = self._ds.done
        val = val.where(done, 0) if done_only else val
        totals = _feature_counts(idx, val.transpose(*idx.dims), d_sae, weighted)
        tokens = done.sum() * (self._ds.sizes["sample"] if which == "completion" else 1) if done_only else \
            self._ds.sizes["question"] * (self._ds.sizes["sample"] if which == "completion" else 1)
        out = totals / tokens
        return out.sel(layer=self._layer(layer)) if layer is not None else out

    def answers(self) -> list[list[str]]:
        """Each question's gold answers as a list (the lake stores them as JSON strings)."""
        import json

        out = []
        for raw in self._ds.answers.values:
            try:
                value = json.loads(str(raw))
            except ValueError:
                value = [str(raw)]
            out.append([str(a) for a in value] if isinstance(value, list) else [str(value)])
        return out

    def top_questions_with_samples(self, feature: int, layer: int | None = None, n: int = 10,
                                   which: Which = "prompt", done_only: bool = True):
        """The N questions where ``feature`` fires most (prompt end, or a question's largest
        completion-end activation), each with its gold answers and every sample (text, correct).
        A pandas DataFrame sorted by activation; ``first_token_entropy`` is the lake's ``entropy`` (nats)."""
        import pandas as pd

        layer = self._layer(layer)
        act = np.asarray(self.feature_activation(feature, layer, which).isel(feature=0).values)
        per_q = act.max(axis=1) if act.ndim == 2 else act
        if done_only:
            per_q = np.where(self._ds.done.values, per_q, 0)
        n = min(n, int((per_q > 0).sum()))
        top = np.argsort(-per_q, kind="stable")[:n]
        answers = self.answers()
        rows = [{"question": int(self._ds.question[q]), "activation": float(per_q[q]),
                 "question_text": str(self._ds.question_text[q].values), "answers": answers[q],
                 "first_token_entropy": float(self._ds.entropy[q]),  # nats, the lake's `entropy`
                 "samples": [str(x) for x in self._ds.completion[q].values],
                 "correct": [bool(x) for x in self._ds.correct[q].values]} for q in top]
        return pd.DataFrame(rows, columns=["question", "activation", "question_text", "answers", "first_token_entropy",
                                           "samples", "correct"])

    def cofiring(self, feature: int, layer: int | None = None, n: int = 10, which: Which = "prompt",
                 done_only: bool = True):
        """The features that fire with ``feature`` most selectively: a DataFrame of (feature,
        together: tokens where both fire, share: together / tokens where ``feature`` fires,
        jaccard: together / tokens where either fires), sorted by jaccard."""
        import pandas as pd

        layer = self._layer(layer)
        idx, val = _codes(self._ds, which)
        i = np.asarray(idx.sel(layer=layer).values).reshape(-1, idx.sizes["k"])
        v = np.asarray(val.sel(layer=layer).values).reshape(-1, idx.sizes["k"])
        if done_only:
            keep = np.asarray(self._ds.done.values)
            keep = np.repeat(keep, self._ds.sizes["sample"]) if which == "completion" else keep
            i, v = i[keep], v[keep]
        rows = ((i == feature) & (v != 0)).any(-1)
        hits = i[rows][v[rows] != 0].astype(np.int64)
        d_sae = int(self._ds.attrs["d_sae"])
        counts = np.bincount(hits, minlength=d_sae)
        counts[feature] = 0
        each = np.bincount(i[v != 0].astype(np.int64), minlength=d_sae)
        fired = max(1, int(rows.sum()))
        jaccard = counts / np.maximum(1, fired + each - counts)
        top = [f for f in np.argsort(-jaccard, kind="stable")[:n] if counts[f] > 0]
        return pd.DataFrame({"feature": [int(f) for f in top], "together": [int(counts[f]) for f in top],
                             "share": [counts[f] / fired for f in top], "jaccard": [float(jaccard[f]) for f in top]})

    # ------------------------------------------------------------------- selection
    def select(self, entropy: tuple[float | None, float | None] | None = None,
               correct: Literal["any", "all", "none"] | None = None, group: str | None = None,
               rivalry: str | None = None, done_only: bool = True, store: str | StoreRef | None = None,
               storage_options: dict | None = None, dataset_ids: Sequence[str | int] | None = None) -> xr.Dataset:
        """Questions by entropy range (the lake's ``entropy``: exact first-token entropy in nats),
        correctness of their samples, rivalry group or dataset id.

        ``group`` ('ambiguous', 'unambiguous' or 'left_out') reads the rivalry result group ``rivalry``
        (default for a one-layer lake: 'rivalry/layer_<L>/paper') of ``store`` (default: the
        store this dataset was opened from with ``open_lake``). ``dataset_ids`` are the dataset's
        own ids (``dataset_id`` for string ids, else the ``question`` coordinate); unknown
        ones raise a KeyError naming them.
        """
        keep = np.ones(self._ds.sizes["question"], bool)
        if dataset_ids is not None:
            source = self._ds["dataset_id"] if "dataset_id" in self._ds else self._ds["question"]
            own = np.asarray([str(i) for i in source.values], dtype=object)
            wanted = np.asarray([str(i) for i in dataset_ids], dtype=object)
            unknown = sorted(set(wanted) - set(own))
            if unknown:
                raise KeyError(f"dataset ids not in this lake: {unknown[:10]}")
            keep &= np.isin(own, wanted)
        if done_only:
            keep &= self._ds.done.values
        if entropy is not None:
            lo, hi = entropy
            e = self._ds.entropy.values
            keep &= (e >= lo if lo is not None else True) & (e <= hi if hi is not None else True)
        if correct is not None:
            c = self._ds.correct.values
            keep &= {"any": c.any(1), "all": c.all(1), "none": ~c.any(1)}[correct]
        if group is not None:
            store = store or self._ds.encoding.get("qsae_store")
            storage_options = storage_options or self._ds.encoding.get("qsae_storage_options")
            layers = [int(x) for x in self._ds.layer.values] if "layer" in self._ds.dims else []
            if rivalry is None and len(layers) == 1:
                rivalry = f"rivalry/layer_{layers[0]}/paper"
            if rivalry is None:
                raise ValueError(f"select(group=...) on a lake with layers {layers}: name the result, "
                                 "e.g. rivalry='rivalry/layer_15/paper'")
            if store is None:
                raise ValueError("select(group=...) needs store= (this dataset was not opened with qsae.open_lake)")
            from qsae.lake.results import lake_state, read_result_group
            from qsae.lake.storage import StoreRef

            groups = ("ambiguous", "unambiguous", "left_out", "not_captured")
            if group not in groups:
                raise ValueError(f"select(group={group!r}): a rivalry group is one of {', '.join(groups)}")
            ref = StoreRef.of(store, storage_options)  # the result proven: all there, and of this lake as it is
            g = read_result_group(ref, rivalry, lake_state(self._ds), rerun=f"qsae rivalry {ref.url}").group.values
            keep &= np.where(g == "", "left_out", g) == group  # results written before 2026-12 stored ""
        return self._ds.isel(question=np.flatnonzero(keep))

    # -------------------------------------------------------------- reconstruction
    def reconstruct(self, decode: Callable[[np.ndarray, np.ndarray], np.ndarray], layer: int | None = None,
                    which: Which = "completion") -> xr.DataArray:
        """x_hat of the stored residuals from their codes, lazy on dask: ``decode`` maps (rows, k)
        indices and values to (rows, d_model) (``qsae.jobs.codes.decoder`` gives the one of the SAE
        the lineage names, its sha256 checked; ``qsae.reconstruct(ds, layer)`` does both). The lake
        itself needs no SAE."""
        layer = self._layer(layer)
        idx, val = _codes(self._ds, which)

        def rows(i: np.ndarray, v: np.ndarray) -> np.ndarray:
            shape = i.shape[:-1]
            return np.asarray(decode(i.reshape(-1, i.shape[-1]), v.reshape(-1, v.shape[-1]))).reshape(*shape, -1)

        return xr.apply_ufunc(
            rows, idx.sel(layer=layer), val.sel(layer=layer), input_core_dims=[["k"], ["k"]],
            output_core_dims=[["d_model"]], dask="parallelized", output_dtypes=[np.float32], keep_attrs=False,
            dask_gufunc_kwargs={"output_sizes": {"d_model": self._ds.sizes["d_model"]}},
        ).rename("x_hat")

    # --------------------------------------------------------------------- helpers
    def _layer(self, layer: int | None) -> int:
        layers = [int(x) for x in self._ds.layer.values]
        if layer is None:
            if len(layers) != 1:
                raise LayerError(f"the lake has layers {layers}: pass layer=")
            return layers[0]
        if layer not in layers:
            raise LayerError(f"layer {layer} is not in the lake (layers {layers})")
        return layer

    def info(self) -> dict[str, Any]:
        """A short summary (for notebooks); ``qsae inspect`` prints the full one."""
        ds = self._ds
        return {"questions": ds.sizes["question"], "done": int(ds.done.sum()), "layers": list(map(int, ds.layer.values)),
                "samples": ds.sizes["sample"], "d_model": ds.sizes["d_model"], "d_sae": ds.attrs.get("d_sae"),
                "k": ds.attrs.get("k"), "model": ds.attrs.get("model")}
