"""Run a base vs fine-tuned comparison: match SAE features, measure firing shifts in the
lakes, and write a results group, a figure and a summary."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from qsae.analysis.matching import FeatureMatch, firing_stats, match_features
from qsae.jobs import interrupt
from qsae.jobs.configs import CompareConfig
from qsae.jobs.figures import pyplot
from qsae.jobs.report import Report, fmt
from qsae.lake.results import lake_state, lineage_of, save_figure, write_result_group

log = logging.getLogger("qsae.jobs.compare")




@dataclass
class CompareResult(Report):
    """The feature match (and, with lakes, the firing shifts), where it was written, and its views."""

    group: str
    summary: dict[str, Any]
    match: FeatureMatch
    table: xr.Dataset
    figure: str | None
    out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"group": self.group, "out": self.out, "figure": self.figure, **self.summary}

    def to_text(self) -> str:
        s = self.summary
        lines = [f"base vs fine-tuned SAE features{'' if s.get('layer') is None else ', layer ' + str(s['layer'])}: "
                 f"{fmt(s['matched'])} pairs matched ({fmt(s['matched_above_0.9'])} above cosine 0.9, mean "
                 f"{fmt(s['mean_matched_similarity'])}); {fmt(s['emerged'])} emerged and {fmt(s['vanished'])} "
                 f"vanished (no counterpart above {s['threshold']})"]
        lines += [f"{role} lake: {line}" for role, line in (s.get("captured") or {}).items()]
        if "inputs" in s:
            lines.append(f"firing from {s['inputs']['position']} codes: {s['inputs']['meaning']}")
            shifts = s.get("largest_shifts", [])
            if not shifts:
                lines.append("no matched feature fires more or less often in the fine-tuned lake")
            else:
                lines.append(f"{fmt(s['features_shifted'])} matched features fire more or less often; the largest "
                             "shifts (firing frequency base -> fine-tuned):")
                lines += [f"  {r['base']:>6} -> {r['finetuned']:<6} cos {fmt(r['similarity'])}: "
                          f"{fmt(r['base_frequency'])} -> {fmt(r['finetuned_frequency'])}" for r in shifts]
            for ex in s.get("emerged_examples", [])[:3]:
                top = ex["top"][0] if ex["top"] else {}
                lines.append(f"emerged feature {ex['feature']} fires on {100 * ex['frequency']:.1f}% of rows, most on "
                             f"\u201c{top.get('question_text', '')}\u201d")
        where = f"results: {self.out} group {self.group!r}; figure: {self.figure}" if self.out else \
            "results: not written (no lake named)"
        lines.append(where + "; --json for every field")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        s = self.summary
        lines = [f"# Base vs fine-tuned features (layer {s['layer']})", "",
                 "| matched | matched > 0.9 | emerged | vanished | threshold | mean matched similarity |",
                 "|---|---|---|---|---|---|",
                 f"| {s['matched']} | {s['matched_above_0.9']} | {s['emerged']} | {s['vanished']} | {s['threshold']} | "
                 f"{s['mean_matched_similarity']:.3f} |", ""]
        if s.get("largest_shifts"):
            lines += ["Largest firing-frequency shifts among matched features:", "",
                      "| base | fine-tuned | similarity | freq base | freq fine-tuned |", "|---|---|---|---|---|"]
            lines += [f"| {r['base']} | {r['finetuned']} | {r['similarity']:.3f} | {r['base_frequency']:.4f} | "
                      f"{r['finetuned_frequency']:.4f} |" for r in s["largest_shifts"]]
        for ex in s.get("emerged_examples", [])[:5]:
            top = ex["top"][0] if ex["top"] else {}
            lines.append(f"- emerged feature {ex['feature']} (fires on {100 * ex['frequency']:.1f}% of samples), most on: "
                         f"“{top.get('question_text', '')}” → “{top.get('completion', '')}”")
        if self.figure:
            lines += ["", f"figure: `{self.figure}`"]
        return "\n".join(lines)


def _decoder(source: str, layer: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The decoder rows of an SAE (k is irrelevant here: a TopK file without one loads with k=1)."""
    from qsae.errors import SAEFormatError
    from qsae.sae.formats import load_sae

    try:
        sae = load_sae(source, layer=layer)
    except SAEFormatError as exc:
        if "needs k" not in str(exc):
            raise
        sae = load_sae(source, layer=layer, k=1)
    return sae.W_dec.detach().cpu().numpy(), {"source": sae.info.source, "sha256": sae.info.sha256,
                                                "d_sae": sae.d_sae, "d_model": sae.d_model}


def check_codes_from(ds: xr.Dataset, url: str, layer: int, sae: dict[str, Any], role: str) -> None:
    """Refuse a lake whose layer-``layer`` codes were not made by this SAE file (sha256, width)."""
    from qsae.errors import LineageError
    from qsae.lake.lineage import Lineage

    try:
        Lineage.of(ds).codes_sae(layer).check(sae["sha256"], sae["d_sae"], where=f"{role} SAE {sae['source']}")
    except LineageError as exc:
        raise type(exc)(f"the {role} lake {url} has layer-{layer} codes from an SAE with sha256 "
                        f"{(ds.attrs.get('sae_sha256') or {}).get(str(layer))}: {exc}; its feature indices "
                        "would be another SAE's features") from None


INPUTS = {
    "prompt_end": "the same prompts through both models (codes at the prompt's last token): shifts are the "
                  "models', not their inputs'",
    "completion_end": "each model's own sampled completions (codes at the completion's last token): the inputs "
                      "differ, so shifts mix what the models compute with what they wrote",
}


def same_prompts(ds_a: xr.Dataset, ds_b: xr.Dataset, url_a: str, url_b: str) -> np.ndarray:
    """The questions finished in both lakes, after refusing lakes whose prompts differ
    (questions, prompt template, or the texts of questions finished in both)."""
    from qsae.errors import LineageError

    why = None
    if not np.array_equal(ds_a.question.values, ds_b.question.values):
        why = "hold other questions"
    elif ds_a.attrs.get("prompt_template") != ds_b.attrs.get("prompt_template"):
        why = "use other prompt templates"
    both = ds_a.done.values & ds_b.done.values if why is None else None
    if why is None and not np.array_equal(ds_a.question_text.values[both], ds_b.question_text.values[both]):
        why = "hold other question texts"
    if why:
        raise LineageError(f"{url_a} and {url_b} {why}: prompt-end firing shifts need the same prompts through both "
                           "models (inputs='completion_end' compares each model's own completions instead)")
    return both


def _lake_layer(layer: int | None, *lakes: xr.Dataset) -> int:
    """The layer to read in both lakes: the given one (present in both), or the only one."""
    from qsae.errors import LayerError

    captured = [sorted(int(x) for x in ds.layer.values) for ds in lakes]
    if layer is None:
        if any(len(c) != 1 for c in captured) or len({c[0] for c in captured}) != 1:
            raise LayerError(f"the lakes have layers {captured}: pass layer=")
        return captured[0][0]
    if any(layer not in c for c in captured):
        raise LayerError(f"layer {layer} is not in both lakes (layers {captured})")
    return layer


def run_compare(cfg: CompareConfig) -> CompareResult:
    """Match features, then (with lakes) firing shifts; write ``<name>/layer_<L>`` into ``out``."""
    from qsae.lake.store import open_lake

    W_a, info_a = _decoder(cfg.base_sae, cfg.layer)
    W_b, info_b = _decoder(cfg.finetuned_sae, cfg.layer)
    match = match_features(W_a, W_b, cfg.threshold, cfg.candidates, cfg.block)
    summary: dict[str, Any] = {**match.summary(), "base_sae": info_a, "finetuned_sae": info_b, "layer": cfg.layer}
    log.info(f"{summary['matched']} pairs matched, {summary['matched_above_0.9']} above 0.9; "
           f"{summary['emerged']} emerged, {summary['vanished']} vanished (threshold {cfg.threshold})")
    table = xr.Dataset(
        {"base_feature": ("pair", match.a), "finetuned_feature": ("pair", match.b), "similarity": ("pair", match.similarity),
         "base_best_similarity": ("base", match.best_a), "finetuned_best_similarity": ("finetuned", match.best_b)},
        coords={"base": np.arange(match.best_a.size), "finetuned": np.arange(match.best_b.size)},
    )
    table["emerged"] = ("finetuned", match.best_b < cfg.threshold)
    table["vanished"] = ("base", match.best_a < cfg.threshold)
    freq_a = freq_b = None
    lineage: dict[str, Any] = {}
    state = None
    if cfg.base_lake and cfg.finetuned_lake:
        ds_a = open_lake(cfg.lake_ref(cfg.base_lake))
        ds_b = open_lake(cfg.lake_ref(cfg.finetuned_lake))
        states = {"base": lake_state(ds_a).require(cfg.base_lake, "compare"),
                  "finetuned": lake_state(ds_b).require(cfg.finetuned_lake, "compare")}
        for role, st in states.items():
            if st.line():
                summary.setdefault("captured", {})[role] = st.line()
        state = states["finetuned"]
        layer = _lake_layer(cfg.layer, ds_a, ds_b)
        for role, ds, url, info in (("base", ds_a, cfg.base_lake, info_a), ("fine-tuned", ds_b, cfg.finetuned_lake, info_b)):
            check_codes_from(ds, url, layer, info, role)
        which, both = "completion", None
        if cfg.inputs == "prompt_end":  # the same questions on both sides: those finished in both lakes
            which, both = "prompt", same_prompts(ds_a, ds_b, cfg.base_lake, cfg.finetuned_lake)
        freq_a, act_a, n_a = firing_stats(ds_a, layer, which, both)
        freq_b, act_b, n_b = firing_stats(ds_b, layer, which, both)
        summary["inputs"] = {"position": cfg.inputs, "meaning": INPUTS[cfg.inputs]}
        log.info(f"firing shifts from {cfg.inputs} codes: {INPUTS[cfg.inputs]}")
        table["base_frequency"] = ("base", freq_a)
        table["finetuned_frequency"] = ("finetuned", freq_b)
        table["base_mean_activation"] = ("base", act_a)
        table["finetuned_mean_activation"] = ("finetuned", act_b)
        shift = freq_b[match.b] - freq_a[match.a]
        table["frequency_shift"] = ("pair", shift)
        order = [i for i in np.argsort(-np.abs(shift), kind="stable")[: cfg.top_n] if shift[i] != 0]
        summary["features_shifted"] = int((shift != 0).sum())  # of the matched pairs; zero shifts are not listed
        summary["largest_shifts"] = [
            {"base": int(match.a[i]), "finetuned": int(match.b[i]), "similarity": float(match.similarity[i]),
             "base_frequency": float(freq_a[match.a[i]]), "finetuned_frequency": float(freq_b[match.b[i]])}
            for i in order]
        emerged = match.emerged
        firing_emerged = emerged[np.argsort(-freq_b[emerged])][: cfg.top_n]
        summary["emerged_examples"] = []
        for f in firing_emerged:
            if freq_b[f] == 0:
                break
            top = ds_b.qsae.top_questions(int(f), layer=layer, n=3)
            summary["emerged_examples"].append({"feature": int(f), "frequency": float(freq_b[f]),
                                                "top": top[["question", "question_text", "completion", "activation"]]
                                                .to_dict("records")})
        summary["tokens"] = {"base": n_a, "finetuned": n_b}  # rows: questions (prompt_end) or samples
        lineage = {"base": lineage_of(dict(ds_a.attrs)), "finetuned": lineage_of(dict(ds_b.attrs))}
    out = cfg.lake_ref(cfg.out or cfg.finetuned_lake) if (cfg.out or cfg.finetuned_lake) else None
    group = f"{cfg.name}/layer_{cfg.layer if cfg.layer is not None else 'all'}"
    fig_url = None
    if out:
        with interrupt.working():  # a stop request waits for the result to be whole
            write_result_group(out, group, table, {"kind": "compare", "summary": summary, "params": cfg.model_dump(),
                                                   "lineage": lineage},
                               state if cfg.out is None or cfg.out == cfg.finetuned_lake else None)
        fig_url = save_figure(compare_figure(match, freq_a, freq_b), out, f"{group}/figure.png")
    return CompareResult(group, summary, match, table, fig_url, out.url if out else None)


def compare_figure(match: FeatureMatch, freq_a: np.ndarray | None, freq_b: np.ndarray | None):
    plt = pyplot()
    n = 2 if freq_a is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6))
    axes = np.atleast_1d(axes)
    bins = np.linspace(-0.2, 1.0, 61)
    axes[0].hist(match.similarity, bins=bins, alpha=0.6, label="assigned pairs")
    axes[0].hist(match.best_b, bins=bins, histtype="step", color="k", label="fine-tuned: best match")
    axes[0].axvline(match.threshold, color="crimson", ls="--", label=f"threshold {match.threshold}")
    axes[0].set_xlabel("decoder cosine similarity")
    axes[0].set_ylabel("features")
    axes[0].legend(fontsize=8)
    if freq_a is not None:
        fa, fb = freq_a[match.a], freq_b[match.b]
        floor = 0.5 / max(1, int(1 / max(fa[fa > 0].min(initial=1), fb[fb > 0].min(initial=1))))
        axes[1].scatter(np.maximum(fa, floor), np.maximum(fb, floor), s=3, alpha=0.4, c=match.similarity, cmap="viridis")
        lim = [floor, 1]
        axes[1].plot(lim, lim, color="crimson", lw=1)
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("firing frequency, base")
        axes[1].set_ylabel("firing frequency, fine-tuned")
        axes[1].set_title("matched features (colour: similarity)", fontsize=9)
    fig.suptitle("base vs fine-tuned SAE features", fontsize=10)
    return fig
