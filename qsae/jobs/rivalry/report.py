"""The rivalry study's result and how it shows itself: the terminal summary, the Prefect
artifact (markdown, figures inline) and JSON, all read from the typed layer results."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import xarray as xr

from qsae.analysis.rivalry import AMBIGUOUS, UNAMBIGUOUS, Calibrated
from qsae.jobs.report import Report

from .layers import LayerResult, PaperLayer, PerQuestionLayer
from .plan import MAX_PROB, PREDICTORS, SCORE


@dataclass
class RivalryResult(Report):
    """The study's result: every layer (typed), the groups, the by-layer table, the figures."""

    group: str
    protocol: str
    layers: dict[int, LayerResult]
    groups: dict[str, Any]
    params: dict[str, Any]
    by_layer: xr.Dataset
    figures: dict[str, str]
    images: dict[str, bytes] = field(repr=False, default_factory=dict)
    store: str = ""
    n_samples: int = 0
    k: int = 0

    @property
    def figure(self) -> str | None:
        return self.figures.get("by_layer")

    @property
    def cautions(self) -> list[str]:
        return [c for r in self.layers.values() for c in r.cautions]

    @property
    def captured_note(self) -> str:
        """'N of M questions captured; ...' on a partial lake, else ''."""
        c = self.groups.get("captured") or {}
        return c.get("note", "") if c.get("n_done", 0) < c.get("n_questions", 0) else ""

    @property
    def summary(self) -> dict[str, Any]:
        """The result as plain JSON types (the result group's attributes and ``--json``)."""
        key = "calibrated" if self.protocol == "paper" else "stratified_by_D"
        return {"protocol": self.protocol, "layers": list(self.layers), "groups": self.groups, "params": self.params,
                "n_samples": self.n_samples, "k": self.k, "cautions": self.cautions,
                "by_layer": {layer: r.to_dict() for layer, r in self.layers.items()},
                "multiple_testing": f"Holm across the layers tested, on the {key} one-sided p-values"}

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "group": self.group, "figures": self.figures, **self.summary}

    def to_text(self, store: str | None = None) -> str:
        lines = [f"feature rivalry ({self.protocol} protocol), layers {list(self.layers)}"]
        lines += [self.captured_note] if self.captured_note else []
        lines += [groups_line(self.groups)]
        for r in self.layers.values():
            lines += paper_text(r) if isinstance(r, PaperLayer) else per_question_text(r)
        lines += [f"caution: {c}" for c in self.cautions]
        lines.append(f"results: {store or self.store} group {self.group!r}; figures: "
                     f"{', '.join(self.figures.values()) or 'none'}")
        return "\n".join(lines)

    def to_markdown(self, store: str | None = None) -> str:
        g = self.groups
        lines = [f"# Feature rivalry ({self.protocol} protocol), layers {list(self.layers)}",
                 f"store `{store or self.store}`, result group `{self.group}` (one group per layer beside it)", "",
                 *([f"**{self.captured_note}**", ""] if self.captured_note else []),
                 f"| group | questions | {g['entropy_meaning']}: range |", "|---|---|---|"]
        for name in (AMBIGUOUS, UNAMBIGUOUS):
            lines.append(f"| {name} | {g[name]['n']} | {fmt(g[name]['entropy_min'])} .. {fmt(g[name]['entropy_max'])} |")
        lines += [f"\n{g['left_out']} questions left out ({g['rule']} rule on {g['entropy_meaning']}).", ""]
        if g.get("strata"):
            lines += [f"Strata ({g['strata']}): " + ", ".join(f"{k} {v[AMBIGUOUS]}/{v[UNAMBIGUOUS]}"
                                                              for k, v in g["composition"].items()) +
                      " (ambiguous/unambiguous)", ""]
        layers = list(self.layers.values())
        lines += paper_markdown(layers, self.params) if self.protocol == "paper" else per_question_markdown(layers)
        if self.cautions:
            lines += ["", "## Cautions", *[f"- {c}" for c in self.cautions]]
        for key, png in self.images.items():
            lines += ["", f"## {key.replace('_', ' ')}", f"![{key}]({png_data_uri(png)})",
                      f"(file: `{self.figures.get(key)}`)"]
        return "\n".join(lines)


def groups_line(g: dict[str, Any]) -> str:
    """One line on the split: sizes, the rule, the entropy used, the strata."""
    line = (f"{g[AMBIGUOUS]['n']} ambiguous, {g[UNAMBIGUOUS]['n']} unambiguous, {g['left_out']} left out "
            f"({g['rule']} rule on {g['entropy_meaning']})")
    if g.get("strata"):
        line += f"; calibrated test within {len(g['composition'])} {g['strata']} strata"
    return line


def fmt(x: Any, digits: int = 3) -> str:
    """A number as a reader wants it: 3 significant digits, n/a for missing."""
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.{digits}g}"


def p_text(c: Calibrated | None) -> str:
    """A calibrated p-value as it may be quoted: with its Monte-Carlo error, never finer than its reference."""
    if c is None or c.p_less is None:
        return "n/a (no information)" if c is not None and c.degenerate else "n/a"
    if c.p_resolution is not None and c.p_less <= c.p_resolution * (1 + 1e-9):
        return f"<= {fmt(c.p_resolution)} (the finest {c.n_perm:,} draws resolve)"
    return fmt(c.p_less) + (f" ± {fmt(c.p_less_mc_se, 2)}" if c.p_less_mc_se is not None else "")


def ci_text(ci: list[float] | None) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def paper_text(r: PaperLayer) -> list[str]:
    c = r.test
    line = (f"layer {r.layer}: calibrated p = {p_text(c)} (Holm {fmt(r.p_less_holm)}), T = {fmt(c.statistic)}; "
            f"paper MWU p = {fmt(r.rivalry.paper.p_less)} (not calibrated)")
    if r.rivalry.pooled is not None:
        line += f"; ignoring {r.strata_variable or 'strata'}: p = {p_text(r.rivalry.pooled)}"
    rows = [line]
    paired = r.correctness.paired if r.correctness else None
    if paired and paired.auroc:
        rows.append(f"  AUROC for correct ({r.correctness.n_correct} of {r.correctness.n}): " + ", ".join(
            f"{PREDICTORS.get(k, k)} {fmt(v)} {ci_text(paired.ci.get(k))}" for k, v in paired.auroc.items()))
        for k, d in paired.difference.items():
            rows.append(f"    rivalry score - {PREDICTORS.get(k, k)}: {fmt(d['value'])} {ci_text(d['ci'])}")
    return rows


def per_question_text(r: PerQuestionLayer) -> list[str]:
    return [f"layer {r.layer}: D-stratified p = {fmt(r.test.p_less)} (Holm {fmt(r.p_less_holm)}; descriptive, not "
            f"calibrated), unconditional MWU p = {fmt(r.descriptive.p_less)}"]


def paper_markdown(layers: list[PaperLayer], params: dict[str, Any]) -> list[str]:
    p = f"p{params['paper']['percentile']:g}"
    lines = [f"| layer | {p} amb (null) | {p} unamb (null) | excess amb / unamb (equal sizes) | T |",
             "|---|---|---|---|---|"]
    for r in layers:
        a, u, c = r.rivalry.ambiguous, r.rivalry.unambiguous, r.test
        lines.append(f"| {r.layer} | {fmt(a.p5)} ({fmt(a.null_p5)}) | {fmt(u.p5)} ({fmt(u.null_p5)}) | "
                     f"{fmt(c.excess.get(AMBIGUOUS))} / {fmt(c.excess.get(UNAMBIGUOUS))} | {fmt(c.statistic)} |")
    lines += ["", "| layer | **p calibrated** ± MC se | Holm | p paper MWU (not calibrated) | "
                  "AUROC score [95% CI] | score - max prob [95% CI] |", "|---|---|---|---|---|---|"]
    for r in layers:
        paired = r.correctness.paired if r.correctness else None
        auc = paired.auroc.get(SCORE) if paired else None
        diff = (paired.difference.get(MAX_PROB) if paired else None) or {}
        lines.append(f"| {r.layer} | **{p_text(r.test)}** | {fmt(r.p_less_holm)} | {fmt(r.rivalry.paper.p_less)} | "
                     f"{fmt(auc)} {ci_text(paired.ci.get(SCORE) if paired else None)} | "
                     f"{fmt(diff.get('value'))} {ci_text(diff.get('ci'))} |")
    lines += ["", "The calibrated p-value compares the excess co-activation structure of the two groups at "
                  "equal sizes (p5 minus its null, which keeps each question's count of active features and "
                  "each feature's values): the larger of its rank p against the groups' own null and against "
                  "relabellings of the questions, never finer than 1/(draws + 1). The paper's MWU treats "
                  "feature pairs as independent and is shown for comparison only."]
    return lines


def per_question_markdown(layers: list[PerQuestionLayer]) -> list[str]:
    lines = ["| layer | statistic | p D-stratified (descriptive) | Holm | informative questions | "
             "p unconditional MWU (confounded) |", "|---|---|---|---|---|---|"]
    for r in layers:
        c = r.test
        lines.append(f"| {r.layer} | {fmt(c.statistic)} | {fmt(c.p_less)} | {fmt(r.p_less_holm)} | "
                     f"{c.n_informative_questions} | {fmt(r.descriptive.p_less)} |")
    lines += ["", "Per-question p-values are descriptive: no null of this score has been shown calibrated "
                  "when one group's completions share answer-type features."]
    return lines


def png_data_uri(png: bytes) -> str:
    """A PNG inlined as a data URI: markdown artifacts show it without access to the store."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
