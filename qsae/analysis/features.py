"""Per-feature statistics of one lake layer, for dashboards and exports (issue 25). No torch.

One pass over the layer's TopK codes (prompt end and completion end), all numpy on the sparse
entries, never a dense question x d_sae array: firing frequency at each position, mean and max
activation, an activation histogram, the top prompt-end questions and top completions per
feature, the entropy histogram of the questions where a feature fires, the features that fire
with it at the prompt end (scipy.sparse co-occurrence), and, when a rivalry result exists, the
share of its prompt-end firing in ambiguous vs unambiguous questions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

HIST_BINS = 20


@dataclass
class Entries:
    """The non-zero code entries of one position: row, feature, value (row = question or question x S + sample)."""

    row: np.ndarray
    feature: np.ndarray
    value: np.ndarray
    n_rows: int


def entries(idx: np.ndarray, val: np.ndarray, keep_rows: np.ndarray) -> Entries:
    """Flatten (rows, k) codes to entries of the kept rows whose value is non-zero (Qwen-Scope's
    negative TopK values count as firing, as everywhere in qsae)."""
    active = (val != 0) & keep_rows[:, None]
    r, j = np.nonzero(active)
    return Entries(r.astype(np.int64), idx[r, j].astype(np.int64), val[r, j].astype(np.float32), int(keep_rows.sum()))


def top_per_feature(e: Entries, n: int) -> dict[int, list[tuple[int, float]]]:
    """For each feature, its ``n`` entries of largest value: [(row, value)], largest first."""
    if e.feature.size == 0:
        return {}
    order = np.lexsort((-e.value, e.feature))
    f, r, v = e.feature[order], e.row[order], e.value[order]
    starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
    ends = np.r_[starts[1:], len(f)]
    return {int(f[s]): list(zip(r[s:min(t, s + n)].tolist(), v[s:min(t, s + n)].tolist())) for s, t in zip(starts, ends)}


def histograms(e: Entries, d_sae: int, vmax: np.ndarray) -> np.ndarray:
    """(d_sae, HIST_BINS) counts of each feature's values on 0..its max (negatives in bin 0)."""
    scale = np.where(vmax[e.feature] > 0, vmax[e.feature], 1.0)
    b = np.clip((e.value / scale * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    return np.bincount(e.feature * HIST_BINS + b, minlength=d_sae * HIST_BINS).reshape(d_sae, HIST_BINS)


def cofiring(e: Entries, d_sae: int, features: np.ndarray, n: int = 5) -> dict[int, list[tuple[int, int]]]:
    """For each of ``features``: the ``n`` features that fire with it most selectively,
    [(feature, rows in common)], ranked by Jaccard index (rows in common / rows where either
    fires): by raw counts every feature's partners would be the few that fire everywhere."""
    import scipy.sparse as sp

    X = sp.csr_matrix((np.ones(len(e.row), np.int32), (e.row, e.feature)), shape=(int(e.row.max(initial=-1)) + 1, d_sae))
    X.sum_duplicates()
    X.data[:] = 1
    Xc = X.tocsc()
    fired = np.diff(Xc.indptr)
    out = {}
    for f in features.tolist():
        rows = Xc.indices[Xc.indptr[f]:Xc.indptr[f + 1]]
        if rows.size == 0:
            out[f] = []
            continue
        counts = np.asarray(X[rows].sum(0)).ravel()
        counts[f] = 0
        jaccard = counts / np.maximum(1, rows.size + fired - counts)
        top = np.argsort(-jaccard, kind="stable")[:n]
        out[f] = [(int(g), int(counts[g])) for g in top if counts[g] > 0]
    return out


@dataclass
class LayerFeatures:
    """Everything a layer's dashboard shows, per feature that fires."""

    layer: int
    d_sae: int
    n_questions: int
    n_samples: int
    features: np.ndarray  # the features that fire at either position, ascending
    freq_prompt: np.ndarray  # (d_sae,)
    freq_completion: np.ndarray
    mean_activation: np.ndarray  # over every done row of both positions, zeros included
    max_activation: np.ndarray
    hist: np.ndarray  # (d_sae, HIST_BINS) of both positions
    entropy_edges: np.ndarray  # (HIST_BINS + 1,)
    entropy_all: np.ndarray  # (HIST_BINS,) all done questions
    entropy_firing: np.ndarray  # (d_sae, HIST_BINS) questions where the feature fires at the prompt end
    top_prompt: dict[int, list[tuple[int, float]]]  # feature -> [(question index, activation)]
    top_completion: dict[int, list[tuple[int, int, float]]]  # feature -> [(question, sample, activation)]
    cofire: dict[int, list[tuple[int, int]]]
    ambiguous_share: dict[str, np.ndarray] = field(default_factory=dict)  # group -> (d_sae,) share of prompt firing
    rivalry_group: str | None = None
    kind: str = "questions"  # or "tokens": a token lake, top_prompt rows are token indices


def token_layer_features(idx: np.ndarray, val: np.ndarray, keep: np.ndarray, layer: int, d_sae: int,
                         top_n: int = 10, cofire_n: int = 5) -> LayerFeatures:
    """A token lake's layer: the same statistics from (tokens, k) codes an SAE gave its stored
    activations (``keep``: the done, non-special tokens); one position, so the "prompt" fields
    hold the tokens' and the completion fields stay empty."""
    e = entries(idx, val, keep)
    count = np.bincount(e.feature, minlength=d_sae)
    vmax = np.full(d_sae, -np.inf)
    np.maximum.at(vmax, e.feature, e.value)
    vmax = np.where(np.isfinite(vmax), vmax, 0.0)
    zero = np.zeros(d_sae)
    return LayerFeatures(
        layer=int(layer), d_sae=d_sae, n_questions=e.n_rows, n_samples=0, features=np.flatnonzero(count > 0),
        freq_prompt=count / max(1, e.n_rows), freq_completion=zero,
        mean_activation=np.bincount(e.feature, e.value, d_sae) / max(1, e.n_rows), max_activation=vmax,
        hist=histograms(e, d_sae, vmax), entropy_edges=np.zeros(0), entropy_all=np.zeros(0, np.int64),
        entropy_firing=np.zeros((d_sae, 0), np.int64), top_prompt=top_per_feature(e, top_n), top_completion={},
        cofire=cofiring(e, d_sae, np.flatnonzero(count > 0), cofire_n) if len(e.row) else {}, kind="tokens",
    )


def layer_features(ds: xr.Dataset, layer: int, top_n: int = 10, cofire_n: int = 5,
                   rivalry: xr.Dataset | None = None, rivalry_group: str | None = None) -> LayerFeatures:
    """Compute a layer's per-feature statistics from an open lake (``open_lake(...).load()`` or lazy)."""
    d_sae = int(ds.attrs["d_sae"])
    li = [int(x) for x in ds.layer.values].index(int(layer))
    done = np.asarray(ds.done.values, bool)
    Q, S = ds.sizes["question"], ds.sizes["sample"]
    p_idx = np.asarray(ds.prompt_codes_idx[li].values)
    p_val = np.asarray(ds.prompt_codes_val[li].values)
    c_idx = np.asarray(ds.codes_idx[li].values).reshape(Q * S, -1)
    c_val = np.asarray(ds.codes_val[li].values).reshape(Q * S, -1)
    ep = entries(p_idx, p_val, done)
    ec = entries(c_idx, c_val, np.repeat(done, S))
    count_p = np.bincount(ep.feature, minlength=d_sae)
    count_c = np.bincount(ec.feature, minlength=d_sae)
    rows_total = max(1, ep.n_rows + ec.n_rows)
    sums = np.bincount(ep.feature, ep.value, d_sae) + np.bincount(ec.feature, ec.value, d_sae)
    vmax = np.full(d_sae, -np.inf)
    np.maximum.at(vmax, ep.feature, ep.value)
    np.maximum.at(vmax, ec.feature, ec.value)
    vmax = np.where(np.isfinite(vmax), vmax, 0.0)
    hist = histograms(ep, d_sae, vmax) + histograms(ec, d_sae, vmax)
    ent = np.asarray(ds.entropy.values, float)
    finite = done & np.isfinite(ent)
    lo, hi = (float(ent[finite].min()), float(ent[finite].max())) if finite.any() else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, HIST_BINS + 1)
    ebin = np.clip(np.searchsorted(edges, ent, side="right") - 1, 0, HIST_BINS - 1)
    ent_all = np.bincount(ebin[finite], minlength=HIST_BINS)
    ok = finite[ep.row]
    ent_firing = np.bincount(ep.feature[ok] * HIST_BINS + ebin[ep.row[ok]],
                             minlength=d_sae * HIST_BINS).reshape(d_sae, HIST_BINS)
    firing = np.flatnonzero((count_p + count_c) > 0)
    top_c = {f: [(r // S, r % S, v) for r, v in rows] for f, rows in top_per_feature(ec, top_n).items()}
    share: dict[str, np.ndarray] = {}
    if rivalry is not None and "group" in rivalry:
        groups = np.asarray(rivalry["group"].reindex(question=ds.question.values).values, dtype=object)
        for g in ("ambiguous", "unambiguous"):
            in_g = np.asarray([str(x) == g for x in groups])
            share[g] = np.bincount(ep.feature[in_g[ep.row]], minlength=d_sae) / np.maximum(count_p, 1)
    return LayerFeatures(
        layer=int(layer), d_sae=d_sae, n_questions=int(done.sum()), n_samples=S, features=firing,
        freq_prompt=count_p / max(1, ep.n_rows), freq_completion=count_c / max(1, ec.n_rows),
        mean_activation=sums / rows_total, max_activation=vmax, hist=hist, entropy_edges=edges,
        entropy_all=ent_all, entropy_firing=ent_firing, top_prompt=top_per_feature(ep, top_n), top_completion=top_c,
        cofire=cofiring(ep, d_sae, firing, cofire_n) if len(ep.row) else {}, ambiguous_share=share,
        rivalry_group=rivalry_group,
    )


def _answers(raw: str) -> list[str]:
    try:
        out = json.loads(raw)
    except ValueError:
        return [raw] if raw else []
    return [str(a) for a in out] if isinstance(out, list) else [str(out)]


class QuestionTable:
    """The per-question text a dashboard shows, read from the lake once (numpy, not per-row xarray)."""

    def __init__(self, ds: xr.Dataset):
        self.ids = np.asarray(ds.question.values)
        self.text = np.asarray(ds.question_text.values).astype(object)
        self.answers_raw = np.asarray(ds.answers.values).astype(object) if "answers" in ds else None
        self.entropy = np.asarray(ds.entropy.values, float)
        self.samples = np.asarray(ds.completion.values).astype(object)
        self.correct = np.asarray(ds.correct.values, bool) if "correct" in ds else np.zeros(self.samples.shape, bool)
        self._cache: dict[int, dict[str, Any]] = {}

    def record(self, q: int) -> dict[str, Any]:
        """Question ``q``'s text, gold answers, entropy and every sample (text, correct)."""
        if q not in self._cache:
            self._cache[q] = {
                "question": int(self.ids[q]), "text": str(self.text[q]),
                "answers": _answers(str(self.answers_raw[q])) if self.answers_raw is not None else [],
                "entropy": float(self.entropy[q]), "samples": [str(x) for x in self.samples[q]],
                "correct": self.correct[q].tolist(),
            }
        return self._cache[q]
