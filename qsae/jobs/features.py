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
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from qsae.analysis.features import HIST_BINS, LayerFeatures, QuestionTable, layer_features, token_layer_features
from qsae.errors import ResultError, ResultMissingError
from qsae.jobs.configs import FeaturesConfig
from qsae.jobs.report import Report
from qsae.lake.results import lake_state, read_result_group
from qsae.lake.storage import StoreRef
from qsae.lake.store import open_lake

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
def _model_folder(attrs: dict[str, Any]) -> Path | None:
    """The local folder of the lake's model (the lineage's model_path; the embedded alias's cache)."""
    path = attrs.get("model_path")
    if not path:
        return None
    from qsae.lm.locate import EMBEDDED, default_cache_dir

    if path in EMBEDDED:
        folder = default_cache_dir() / "models" / path
        return folder if (folder / "config.json").exists() else None
    folder = Path(str(path)).expanduser()
    return folder if (folder / "config.json").exists() else None


def unembedding(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(W_U (vocab, d), the final norm's effective gain (d,)) read from safetensors, tensor by
    tensor. Qwen3.5-style norms scale by (1 + weight), Llama-style by weight."""
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    found: dict[str, np.ndarray] = {}
    wanted = {"unembed": ("lm_head.weight", "model.lm_head.weight"),
              "embed": ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
              "norm": ("model.norm.weight", "model.language_model.norm.weight")}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for role, names in wanted.items():
                for name in names:
                    if role not in found and name in keys:
                        found[role] = f.get_tensor(name).float().numpy()
    W_U = found.get("unembed", found.get("embed") if cfg.get("tie_word_embeddings", text.get("tie_word_embeddings")) else None)
    if W_U is None or "norm" not in found:
        raise FileNotFoundError(f"no unembedding or final norm weight in {folder}")
    kind = str(text.get("model_type", cfg.get("model_type", "")))
    gain = found["norm"] + 1.0 if kind.startswith(("qwen3_5", "qwen3_next")) else found["norm"]
    return W_U, gain


def logit_effects(attrs: dict[str, Any], layer: int, features: np.ndarray, n: int = 10) -> tuple[dict[int, dict], str | None]:
    """For each feature: the tokens its decoder direction promotes and suppresses most through
    the final norm's gain and the unembedding. Returns (effects, reason skipped or None)."""
    folder = _model_folder(attrs)
    if folder is None:
        return {}, f"the model {attrs.get('model_path')!r} is not available locally"
    try:
        from transformers import AutoTokenizer

        from qsae.sae.formats import load_sae_for

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
    _write(fs, f"{root}/index.html", _INDEX.replace("__META__", _js(meta)).replace("__ROWS__", _js(rows))
           .replace("__TITLE__", html.escape(title)))
    _write(fs, f"{root}/feature.html", _FEATURE.replace("__META__", _js(meta)).replace("__TITLE__", html.escape(title)))
    return f"{base.url}/index.html", len(feats), batches


def _js(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")


def neuronpedia_batches(lf: LayerFeatures, records: dict[int, dict[str, Any]], attrs: dict[str, Any], out_dir: str,
                        batch_size: int = 128, start: int = 0, tokenizer=None) -> list[str]:
    """SAEDashboard's Neuronpedia output: ``batch-<i>.json`` of features with their top
    activations (the prompt's and the completion's tokens, the value at the captured token),
    the logit effects and the frequency and logit histograms."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)

    def tokens_of(text: str) -> list[str]:
        if tokenizer is not None:
            return [tokenizer.decode([t]) for t in tokenizer(text, add_special_tokens=False).input_ids] or [text]
        return text.split(" ") if text else [""]

    written = []
    feats = list(records)
    for i in range(0, len(feats), batch_size):
        items = []
        for f in feats[i:i + batch_size]:
            r = records[f]
            acts = []
            for row in r["top_prompt"]:
                toks = tokens_of(f"Q: {row['text']}\nA:")
                acts.append({"tokens": toks, "values": [0.0] * (len(toks) - 1) + [row["activation"]],
                             "position": "prompt_end", "question": row["question"]})
            for row in r.get("top_contexts", []):
                left = tokens_of(row["left"]) if row["left"] else []
                acts.append({"tokens": [*left, row["tok"]], "values": [0.0] * len(left) + [row["activation"]],
                             "position": "token", "token": row["token"]})
            for row in r["top_completion"]:
                toks = tokens_of(row["completion"])
                acts.append({"tokens": toks, "values": [0.0] * (len(toks) - 1) + [row["activation"]],
                             "position": "completion_end", "question": row["question"], "sample": row["sample"]})
            logits = r.get("logits", {})
            hist = r["hist"]
            edges = np.linspace(0, r["max"], HIST_BINS + 1)
            items.append({
                "feature_index": f, "activations": acts,
                "pos_str": [t for t, _ in logits.get("pos", [])], "pos_values": [v for _, v in logits.get("pos", [])],
                "neg_str": [t for t, _ in logits.get("neg", [])], "neg_values": [v for _, v in logits.get("neg", [])],
                "frac_nonzero": (r["freq_prompt"] + r["freq_completion"] * lf.n_samples) / (1 + lf.n_samples),
                "freq_hist_data_bar_heights": hist, "freq_hist_data_bar_values": ((edges[:-1] + edges[1:]) / 2).tolist(),
                "logits_hist_data_bar_heights": logits.get("hist", [[], []])[0],
                "logits_hist_data_bar_values": logits.get("hist", [[], []])[1],
                "n_prompts_total": lf.n_questions * (1 + lf.n_samples),
            })
        batch = {"model_id": attrs.get("model"), "layer": lf.layer, "sae_set": attrs.get("sae_source"),
                 "hook": attrs.get("hook"), "features": items}
        path = f"{root}/batch-{start + i // batch_size}.json"
        _write(fs, path, json.dumps(batch, ensure_ascii=False))
        written.append(path)
    return written


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
    if cfg.neuronpedia and _model_folder(attrs) is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(_model_folder(attrs), local_files_only=True)
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
    folder = _model_folder(attrs)
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


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.4em}
table{border-collapse:collapse}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}td.l,th.l{text-align:left}a{color:#0645ad}
.bar{display:inline-block;background:#4a7fd0;vertical-align:bottom;width:12px;margin-right:1px}
.bar.alt{background:#d07a4a}.chart{height:80px;display:flex;align-items:flex-end}.ok{color:#17803d}.no{color:#b3261e}
.sample{display:inline-block;margin:.1em .3em;padding:0 .3em;border-radius:3px;background:#f2f2f2}
.first{font-weight:bold}.tok{background:#ffe08a;padding:0 .2em;border-radius:3px}.muted{color:#777}
"""

_INDEX = """<!doctype html><html><head><meta charset="utf-8"><title>__TITLE__</title><style>""" + _STYLE + """</style></head>
<body><h1>__TITLE__</h1><p id="meta" class="muted"></p>
<p><input id="filter" placeholder="filter: feature id, or min frequency like >0.01" size="40"> <span id="count"></span></p>
<table id="t"><thead><tr><th data-k="0">feature</th><th data-k="1">freq prompt end</th><th data-k="2">freq completion end</th>
<th data-k="3">mean act</th><th data-k="4">max act</th><th data-k="5">share ambiguous</th><th data-k="6">share unambiguous</th>
<th class="l">fires with</th></tr></thead><tbody></tbody></table>
<script>
const META=__META__, ROWS=__ROWS__;
if(META.kind==='tokens'){document.querySelectorAll('th')[1].textContent='firing frequency';}
document.getElementById('meta').textContent=(META.kind==='tokens'?META.questions+' tokens; ':META.questions+' questions x '+META.samples+' samples; ')+ROWS.length+
 ' of '+META.d_sae+' features fire'+(META.rivalry?'; ambiguity from '+META.rivalry:'; no rivalry result: no ambiguity shares');
let key=1, desc=true;
const fmt=v=>v===null||v===undefined?'':(Math.abs(v)<0.001&&v!==0?v.toExponential(2):(+v).toFixed(4));
function render(){
 const q=document.getElementById('filter').value.trim();
 let rows=ROWS;
 if(q.startsWith('>')) rows=rows.filter(r=>Math.max(r[1],r[2])>parseFloat(q.slice(1)));
 else if(q) rows=rows.filter(r=>String(r[0]).startsWith(q));
 rows=rows.slice().sort((a,b)=>((a[key]??-1)-(b[key]??-1))*(desc?-1:1));
 const shown=rows.slice(0,2000);
 document.querySelector('#t tbody').innerHTML=shown.map(r=>'<tr><td><a href="feature.html#'+r[0]+'">'+r[0]+'</a></td>'+
  [1,2,3,4,5,6].map(i=>'<td>'+fmt(r[i])+'</td>').join('')+'<td class="l">'+r[7].map(f=>'<a href="feature.html#'+f+'">'+f+'</a>').join(', ')+'</td></tr>').join('');
 document.getElementById('count').textContent=rows.length+' features'+(rows.length>shown.length?' (first '+shown.length+' shown)':'');
}
document.querySelectorAll('th[data-k]').forEach(th=>th.onclick=()=>{const k=+th.dataset.k;desc=(k===key)?!desc:true;key=k;render();});
document.getElementById('filter').oninput=render;render();
</script></body></html>
"""

_FEATURE = """<!doctype html><html><head><meta charset="utf-8"><title>__TITLE__</title><style>""" + _STYLE + """</style></head>
<body><p><a href="index.html">&larr; all features</a></p><h1 id="h">__TITLE__</h1><div id="body">loading&hellip;</div>
<script>
const META=__META__;
const esc=s=>String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
const bars=(h,cls)=>{const m=Math.max(1,...h);return '<div class="chart">'+h.map(v=>'<span class="bar '+(cls||'')+'" style="height:'+(80*v/m)+'px" title="'+v+'"></span>').join('')+'</div>';};
function firstWord(s){const m=String(s).match(/^(\\S+)(.*)$/s);return m?'<span class="first">'+esc(m[1])+'</span>'+esc(m[2]):esc(s);}
function show(f,r){
 document.getElementById('h').textContent='Feature '+f+' · layer '+META.layer;
 if(!r){document.getElementById('body').textContent='feature '+f+' never fires in this lake';return;}
 let h='<p>fires on '+(100*r.freq_prompt).toFixed(2)+'% of prompt ends and '+(100*r.freq_completion).toFixed(2)+
  '% of completion ends; mean activation '+r.mean.toPrecision(3)+', max '+r.max.toPrecision(3)+
  (r.share_ambiguous!==undefined?'; of its prompt-end firing '+(100*r.share_ambiguous).toFixed(1)+'% in ambiguous, '+
  (100*r.share_unambiguous).toFixed(1)+'% in unambiguous questions':'')+'</p>';
 h+='<h2>Activation histogram</h2>'+bars(r.hist)+'<p class="muted">0 .. '+r.max.toPrecision(3)+'</p>';
 if(META.kind==='tokens'){
  h+='<h2>Top contexts</h2><table><tr><th>act</th><th class="l">context (the token highlighted)</th><th>doc</th></tr>'+
   r.top_contexts.map(c=>'<tr><td>'+c.activation.toFixed(3)+'</td><td class="l">'+esc(c.left)+'<span class="tok">'+esc(c.tok)+'</span>'+esc(c.right)+
   '</td><td>'+c.doc+'</td></tr>').join('')+'</table>';
 } else {
 h+='<h2>First-token entropy (nats) of the questions where it fires (orange) vs all questions (blue)</h2><div style="display:flex;gap:2em">'+
  bars(r.entropy_firing,'alt')+bars(META.entropy_all)+'</div><p class="muted">'+META.entropy_edges[0].toFixed(2)+' .. '+
  META.entropy_edges[META.entropy_edges.length-1].toFixed(2)+' nats</p>';
 h+='<h2>Top questions by prompt-end activation</h2><table><tr><th>act</th><th class="l">question</th><th class="l">gold</th><th title="exact entropy of the first token, softmax(logits / T), in nats">first-token entropy (nats)</th><th class="l">all samples (first word bold; green correct)</th></tr>'+
  r.top_prompt.map(q=>'<tr><td>'+q.activation.toFixed(3)+'</td><td class="l">'+esc(q.text)+'</td><td class="l">'+esc(q.answers.slice(0,3).join(' / '))+
  '</td><td>'+q.entropy.toFixed(2)+'</td><td class="l">'+q.samples.map((s,i)=>'<span class="sample '+(q.correct[i]?'ok':'no')+'">'+firstWord(s)+'</span>').join('')+'</td></tr>').join('')+'</table>';
 h+='<h2>Top completions by completion-end activation</h2><table><tr><th>act</th><th class="l">question</th><th class="l">completion (captured token: its end)</th><th>correct</th></tr>'+
  r.top_completion.map(c=>'<tr><td>'+c.activation.toFixed(3)+'</td><td class="l">'+esc(c.text)+'</td><td class="l">'+esc(c.completion)+
  '<span class="tok">&#8629;</span></td><td class="'+(c.correct?'ok':'no')+'">'+(c.correct?'yes':'no')+'</td></tr>').join('')+'</table>';
 }
 h+='<h2>Fires with '+(META.kind==='tokens'?'(same token)':'(prompt end)')+'</h2><p>'+(r.cofire.length?r.cofire.map(c=>'<a href="#'+c[0]+'">'+c[0]+'</a> ('+c[1]+')').join(', '):'none')+'</p>';
 h+='<h2>Decoder logit effects</h2>'+(r.logits?'<table><tr><th class="l">promotes</th><th></th><th class="l">suppresses</th><th></th></tr>'+
  r.logits.pos.map((p,i)=>'<tr><td class="l">'+esc(JSON.stringify(p[0]))+'</td><td>'+p[1].toFixed(3)+'</td><td class="l">'+esc(JSON.stringify(r.logits.neg[i][0]))+'</td><td>'+r.logits.neg[i][1].toFixed(3)+'</td></tr>').join('')+'</table>'
  :'<p class="muted">skipped: '+esc(META.logits_skipped||'not computed')+'</p>');
 document.getElementById('body').innerHTML=h;
}
const loaded={};
window.qsaeBlock=(b,data)=>{loaded[b]=data;const f=current();if(Math.floor(f/META.block)===b)show(f,data[f]);};
function current(){return parseInt(location.hash.slice(1)||'0',10);}
function load(){const f=current(),b=Math.floor(f/META.block);
 if(loaded[b]){show(f,loaded[b][f]);return;}
 const s=document.createElement('script');s.src='data/block_'+String(b).padStart(4,'0')+'.js';
 s.onerror=()=>show(f,null);document.head.appendChild(s);}
window.onhashchange=load;load();
</script></body></html>
"""
