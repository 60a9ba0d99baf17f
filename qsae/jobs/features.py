"""Feature dashboards from a lake: a static HTML index and feature pages per layer, and a
Neuronpedia export (issue 25).

``run_features(FeaturesConfig(store=...))`` writes, for each layer, beside the store (the same
``<store>.figures/`` folder the analyses use, local or fsspec):

    features/layer_<L>/index.html      one row per feature that fires (sortable, filterable)
    features/layer_<L>/feature.html    the feature page: ``feature.html#983``
    features/layer_<L>/data/block_<b>.js   the data of 256 features each

The pages open from ``file://`` with no server and no internet: the data arrive through
``<script>`` tags (a browser refuses ``fetch`` of local files), one block per page view, so a
32,768-feature layer never loads whole. Decoder logit effects (W_dec[f] through the final norm's
weight and the unembedding) are read from the model's safetensors without loading the model, or
skipped with a stated reason. ``--neuronpedia DIR`` writes SAEDashboard's Neuronpedia batches.
"""

from __future__ import annotations

import html
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from qsae.analysis.features import HIST_BINS, LayerFeatures, QuestionTable, layer_features, token_layer_features
from qsae.errors import ResultError, ResultMissingError
from qsae.jobs.configs import FeaturesConfig
from qsae.jobs.neuronpedia import neuronpedia_batches
from qsae.jobs.report import Report
from qsae.lake.results import lake_state, read_result_group
from qsae.lake.storage import StoreRef
from qsae.lake.store import open_lake
from qsae.lm.weights import local_model_folder, unembedding

log = logging.getLogger("qsae.jobs.features")
BLOCK = 256


@dataclass
class FeaturesResult(Report):
    """Where each layer's dashboard went, and what it holds."""

    store: str
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    neuronpedia: str | None = None
    seconds: float = 0.0
    captured: str = ""  # "N of M questions captured; the rest are not in this result" on a partial lake
    cautions: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        lines = [f"feature dashboards of {self.store} ({self.seconds:.1f} s)"] + ([self.captured] if self.captured else [])
        for layer, info in self.layers.items():
            lines.append(f"  layer {layer}: {info['features']} features fire; open {info['index']}")
            if info.get("logit_effects_skipped"):
                lines.append(f"    decoder logit effects skipped: {info['logit_effects_skipped']}")
        if self.neuronpedia:
            lines.append(f"  Neuronpedia batches: {self.neuronpedia}")
        lines += [f"caution: {c}" for c in self.cautions]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        rows = "\n".join(f"| {layer} | {info['features']} | `{info['index']}` |" for layer, info in self.layers.items())
        head = f"**{self.captured}**\n\n" if self.captured else ""
        notes = "".join(f"\n- caution: {c}" for c in self.cautions)
        return (f"# Feature dashboards\n\n{self.store}\n\n{head}| layer | features firing | index |\n|---|---|---|\n"
                f"{rows}\n{notes}")

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "layers": {str(k): v for k, v in self.layers.items()},
                "neuronpedia": self.neuronpedia, "seconds": self.seconds, "captured": self.captured or None,
                "cautions": self.cautions}


# ----------------------------------------------------------------- logit effects
def logit_effects(attrs: dict[str, Any], layer: int, features: np.ndarray, n: int = 10) -> tuple[dict[int, dict], str | None]:
    """For each feature: the tokens its decoder direction promotes and suppresses most through
    the final norm's gain and the unembedding. Returns (effects, reason skipped or None)."""
    folder = local_model_folder(attrs.get("model_path"))
    if folder is None:
        return {}, f"the model {attrs.get('model_path')!r} is not available locally"
    try:
        from transformers import AutoTokenizer

        from qsae.jobs.codes import load_sae_for

        sae = load_sae_for(attrs, layer)
        W_U, gain = unembedding(folder)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a dashboard without logit effects, with the reason
        return {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    W_dec = sae.W_dec.detach().float().cpu().numpy()  # (d_sae, d_model)
    out = {}
    for a in range(0, len(features), 512):
        f = features[a:a + 512]
        effect = (W_dec[f] * gain) @ W_U.T  # (n_f, vocab)
        top = np.argpartition(-effect, n, axis=1)[:, :n]
        bottom = np.argpartition(effect, n, axis=1)[:, :n]
        for i, feat in enumerate(f.tolist()):
            pos = top[i][np.argsort(-effect[i, top[i]])]
            neg = bottom[i][np.argsort(effect[i, bottom[i]])]
            counts, edges = np.histogram(effect[i], bins=HIST_BINS)
            out[feat] = {"pos": [[tok.decode([int(t)]), float(effect[i, t])] for t in pos],
                         "neg": [[tok.decode([int(t)]), float(effect[i, t])] for t in neg],
                         "hist": [counts.tolist(), ((edges[:-1] + edges[1:]) / 2).tolist()]}
    return out, None


# ------------------------------------------------------------------------ output
def _write(fs, path: str, text: str) -> None:
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(text)


def feature_records(lf: LayerFeatures, questions: QuestionTable | TokenContexts, effects: dict[int, dict],
                    features: list[int]) -> dict[int, dict[str, Any]]:
    """The page data (JSON-ready) of ``features``."""
    if isinstance(questions, TokenContexts):
        return _token_records(lf, questions, effects, features)
    out = {}
    for f in features:
        rec: dict[str, Any] = {
            "feature": f, "freq_prompt": float(lf.freq_prompt[f]), "freq_completion": float(lf.freq_completion[f]),
            "mean": float(lf.mean_activation[f]), "max": float(lf.max_activation[f]),
            "hist": lf.hist[f].tolist(), "entropy_firing": lf.entropy_firing[f].tolist(),
            "top_prompt": [{**questions.record(q), "activation": v} for q, v in lf.top_prompt.get(f, [])],
            "top_completion": [],
            "cofire": lf.cofire.get(f, []),
        }
        for q, s_, v in lf.top_completion.get(f, []):
            r = questions.record(q)
            rec["top_completion"].append({"question": r["question"], "text": r["text"], "answers": r["answers"],
                                          "entropy": r["entropy"], "sample": s_, "completion": r["samples"][s_],
                                          "correct": r["correct"][s_], "activation": v})
        for g, share in lf.ambiguous_share.items():
            rec[f"share_{g}"] = float(share[f])
        if f in effects:
            rec["logits"] = effects[f]
        out[f] = rec
    return out


class TokenContexts:
    """Token windows around a token lake's tokens, decoded with the model's tokenizer."""

    def __init__(self, ds, tokenizer, width: int = 8):
        self.ids = np.asarray(ds.token_id.values)
        self.doc = np.asarray(ds.doc.values)
        self.tok = tokenizer
        self.width = width

    def window(self, t: int) -> dict[str, Any]:
        lo, hi = max(0, t - self.width), min(len(self.ids), t + 4)
        same = self.doc[lo:hi] == self.doc[t]
        ids = self.ids[lo:hi]
        left = [int(i) for i, ok in zip(ids[:t - lo], same[:t - lo]) if ok]
        right = [int(i) for i, ok in zip(ids[t - lo + 1:], same[t - lo + 1:]) if ok]

        def text(x: list[int]) -> str:
            return self.tok.decode(x) if self.tok is not None else " ".join(map(str, x))

        return {"token": t, "doc": int(self.doc[t]), "left": text(left), "tok": text([int(self.ids[t])]),
                "right": text(right)}


def _token_records(lf: LayerFeatures, ctx: TokenContexts, effects: dict[int, dict], features: list[int]) -> dict[int, dict]:
    out = {}
    for f in features:
        rec: dict[str, Any] = {
            "feature": f, "freq_prompt": float(lf.freq_prompt[f]), "freq_completion": 0.0,
            "mean": float(lf.mean_activation[f]), "max": float(lf.max_activation[f]), "hist": lf.hist[f].tolist(),
            "entropy_firing": [], "top_prompt": [], "top_completion": [], "cofire": lf.cofire.get(f, []),
            "top_contexts": [{**ctx.window(t), "activation": v} for t, v in lf.top_prompt.get(f, [])],
        }
        if f in effects:
            rec["logits"] = effects[f]
        out[f] = rec
    return out


def write_layer(lf: LayerFeatures, questions: QuestionTable, effects: dict[int, dict], target: StoreRef, title: str,
                skipped: str | None, attrs: dict[str, Any], neuronpedia_dir: str | None = None,
                tokenizer=None) -> tuple[str, int, list[str]]:
    """Write one layer's dashboard block by block (256 features at a time, never all in memory)
    and, when asked, its Neuronpedia batches. Returns (index URL, features, batch files)."""
    base = target.figures / f"features/layer_{lf.layer}"
    fs, root = base.fs()
    fs.makedirs(f"{root}/data", exist_ok=True)
    feats = lf.features.tolist()
    rows, batches = [], []
    by_block: dict[int, list[int]] = {}
    for f in feats:
        by_block.setdefault(f // BLOCK, []).append(f)
    for b, members in by_block.items():
        recs = feature_records(lf, questions, effects, members)
        _write(fs, f"{root}/data/block_{b:04d}.js",
               f"qsaeBlock({b}, {json.dumps(recs, separators=(',', ':'), ensure_ascii=False)});\n")
        rows += [[f, r["freq_prompt"], r["freq_completion"], r["mean"], r["max"], r.get("share_ambiguous"),
                  r.get("share_unambiguous"), [c[0] for c in r["cofire"][:3]]] for f, r in recs.items()]
        if neuronpedia_dir is not None:
            batches += neuronpedia_batches(lf, recs, attrs, neuronpedia_dir, start=len(batches), tokenizer=tokenizer)
    meta = {"title": title, "layer": lf.layer, "questions": lf.n_questions, "samples": lf.n_samples, "d_sae": lf.d_sae,
            "block": BLOCK, "entropy_edges": lf.entropy_edges.tolist(), "entropy_all": lf.entropy_all.tolist(),
            "rivalry": lf.rivalry_group, "logits_skipped": skipped, "kind": lf.kind}
    _write(fs, f"{root}/index.html", template("index.html").replace("__META__", _js(meta)).replace("__ROWS__", _js(rows))
           .replace("__TITLE__", html.escape(title)))
    _write(fs, f"{root}/feature.html", template("feature.html").replace("__META__", _js(meta)).replace("__TITLE__", html.escape(title)))
    return f"{base.url}/index.html", len(feats), batches


def template(name: str) -> str:
    """A dashboard page template (package data ``qsae/data/dashboard/``), the style sheet inlined:
    the pages open from ``file://`` with nothing beside them."""
    folder = resources.files("qsae") / "data" / "dashboard"
    return (folder / name).read_text(encoding="utf-8").replace("__STYLE__", (folder / "style.css").read_text(
        encoding="utf-8"))


def _js(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")


def run_features(cfg: FeaturesConfig) -> FeaturesResult:
    """Every requested layer's dashboard (and the Neuronpedia export when asked)."""
    t0 = time.perf_counter()
    ds = open_lake(cfg.ref)  # lazy: a layer's codes and the question text are read, never the residuals
    attrs = dict(ds.attrs)
    if "acts" in ds and "token_id" in ds:
        return _run_token_features(cfg, ds, attrs, t0)
    if "codes_idx" not in ds:
        from qsae.errors import SchemaError

        raise SchemaError(f"{cfg.store} holds no SAE codes: features needs a lake captured with an SAE")
    layers = cfg.layers or [int(x) for x in ds.layer.values]
    state = lake_state(ds).require(cfg.store, "show")
    result = FeaturesResult(store=cfg.store, captured=state.line())
    tokenizer = None
    questions = QuestionTable(ds)
    if cfg.neuronpedia and local_model_folder(attrs.get("model_path")) is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local_model_folder(attrs.get("model_path")), local_files_only=True)
    for layer in layers:
        rivalry, group, why = _rivalry_for(cfg, layer, state)
        if why:
            result.cautions.append(f"layer {layer}: no ambiguity shares: {why}")
        lf = layer_features(ds, layer, top_n=cfg.top_n, rivalry=rivalry, rivalry_group=group)
        effects, skipped = logit_effects(attrs, layer, lf.features) if cfg.logit_effects else ({}, "not asked")
        if skipped and cfg.logit_effects:
            log.info("layer %d: decoder logit effects skipped: %s", layer, skipped)
        title = f"{attrs.get('model', 'model')} · layer {layer} · {attrs.get('sae_source', 'SAE')}"
        np_dir = f"{cfg.neuronpedia.rstrip('/')}/layer_{layer}" if cfg.neuronpedia else None
        index, n, batches = write_layer(lf, questions, effects, cfg.ref, title, skipped, attrs, np_dir, tokenizer)
        info: dict[str, Any] = {"features": n, "index": index, "logit_effects_skipped": skipped}
        if np_dir:
            info["neuronpedia"] = batches
            result.neuronpedia = cfg.neuronpedia
        result.layers[int(layer)] = info
    result.seconds = time.perf_counter() - t0
    return result


def _run_token_features(cfg: FeaturesConfig, ds, attrs: dict[str, Any], t0: float) -> FeaturesResult:
    """A token lake (``qsae collect``): the SAE named by ``cfg.sae`` encodes the stored
    activations block by block; the top contexts are token windows with the token highlighted."""
    import torch

    from qsae.errors import SAEFormatError
    from qsae.sae.formats import load_sae

    if not cfg.sae:
        raise SAEFormatError(f"{cfg.store} is a token lake (activations, no codes): name the SAE that encodes them "
                             "with --set sae=<folder or repo id>")
    folder = local_model_folder(attrs.get("model_path"))
    tokenizer = None
    if folder is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ctx = TokenContexts(ds, tokenizer)
    keep = np.asarray(ds.done.values, bool) & ~np.asarray(ds.special.values, bool)
    result = FeaturesResult(store=cfg.store)
    layers = cfg.layers or [int(x) for x in ds.layer.values]
    for layer in layers:
        sae = load_sae(cfg.sae, layer=layer, k=cfg.sae_k)
        k = cfg.sae_k or sae.k
        n = ds.sizes["token"]
        idx = np.zeros((n, k), np.int32)
        val = np.zeros((n, k), np.float32)
        acts = ds.acts.sel(layer=layer)
        for a in range(0, n, 8192):
            x = torch.from_numpy(np.asarray(acts[a:a + 8192].values, np.float32))
            x = torch.nan_to_num(x)  # a non-finite row (flagged in the lake) gets a meaningless code, masked below
            i, v = sae.encode_topk(x, k=k)
            idx[a:a + len(x)], val[a:a + len(x)] = i.numpy(), v.detach().numpy()
        ok = keep & np.isfinite(np.asarray(ds.norm.sel(layer=layer).values))
        lf = token_layer_features(idx, val, ok, layer, sae.d_sae, top_n=cfg.top_n)
        lineage = {**attrs, "sae_source": cfg.sae, "sae_sha256": {str(layer): sae.info.sha256}}
        effects, skipped = logit_effects(lineage, layer, lf.features) if cfg.logit_effects else ({}, "not asked")
        title = f"{attrs.get('model', 'model')} · layer {layer} · {cfg.sae} · token lake"
        np_dir = f"{cfg.neuronpedia.rstrip('/')}/layer_{layer}" if cfg.neuronpedia else None
        index, nf, batches = write_layer(lf, ctx, effects, cfg.ref, title, skipped, lineage, np_dir, tokenizer)
        result.layers[int(layer)] = {"features": nf, "index": index, "logit_effects_skipped": skipped,
                                     **({"neuronpedia": batches} if np_dir else {})}
        result.neuronpedia = cfg.neuronpedia
    result.seconds = time.perf_counter() - t0
    return result


def _rivalry_for(cfg: FeaturesConfig, layer: int, state):
    """The layer's rivalry result group (question -> ambiguous/unambiguous) if one exists and is
    proven (every chunk there, computed from the lake as it is now); else (None, None, why not),
    ``why`` empty when there simply is none."""
    for protocol in ("paper", "per_question"):
        group = f"rivalry/layer_{layer}/{protocol}"
        try:
            return read_result_group(cfg.ref, group, state, rerun=f"qsae rivalry {cfg.store}").load(), group, ""
        except ResultMissingError:
            continue
        except ResultError as exc:  # stale or damaged: never its shares, and the reason said
            return None, None, str(exc)
    return None, None, ""
