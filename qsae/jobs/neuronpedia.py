"""SAEDashboard's Neuronpedia export of a layer's features (``batch-<i>.json``)."""

from __future__ import annotations

import json
from typing import Any

import fsspec
import numpy as np

from qsae.analysis.features import HIST_BINS, LayerFeatures


def _write(fs, path: str, text: str) -> None:
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(text)


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

    template = str(attrs.get("prompt_template") or "Q: {question}\nA:")

    def prompt(text: str) -> str:  # the lake's own template, as capture filled it
        try:
            return template.format(question=text)
        except (KeyError, IndexError, ValueError):  # a template with row fields the record does not carry
            return template.replace("{question}", text)

    written = []
    feats = list(records)
    for i in range(0, len(feats), batch_size):
        items = []
        for f in feats[i:i + batch_size]:
            r = records[f]
            acts = []
            for row in r["top_prompt"]:
                toks = tokens_of(prompt(row["text"]))
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
