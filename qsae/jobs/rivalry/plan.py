"""The rivalry study's plan: everything that does not depend on the layer, read once (the
question table, entropy, groups, strata, distinct completions, correctness), and the names the
results and their renderings share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from qsae.analysis.rivalry import (
    AMBIGUOUS,
    NOT_CAPTURED,
    UNAMBIGUOUS,
    Grouping,
    distinct_rows,
    entropy_groups,
    first_word_entropy,
)
from qsae.errors import LayerError, SchemaError
from qsae.jobs.configs import RivalryConfig
from qsae.lake.results import LakeState
from qsae.lake.store import open_lake

SCORE, MAX_PROB, NEG_ENTROPY = "rivalry_score", "max_first_token_prob", "neg_exact_entropy"
# What each predictor of correctness is, for the tables, legends and the summary (keys are identifiers).
PREDICTORS = {SCORE: "rivalry score (-decoder-cosine p5)", MAX_PROB: "first-token max probability",
              NEG_ENTROPY: "-exact first-token entropy (nats)"}
# The codes each protocol reads: the prompt's last token (the paper), each completion's last token.
CODES = {"paper": ("prompt_codes_idx", "prompt_codes_val"), "per_question": ("codes_idx", "codes_val")}
CORRECT_LABEL = "correct: at least half of the question's samples contain a gold answer"
NULL_NAMES = {"fixed_fixed": "each question's count of active features and each feature's values kept, "
                             "co-activation otherwise random (curveball)",
              "feature_marginal": "each feature's values moved to random questions of the group (counts per "
                                  "question not kept: TopK's fixed k reads as rivalry)"}
ENTROPY_NAMES = {"first_word": "first-word entropy / log S (0..1)", "exact": "exact first-token entropy (nats)",
                 "sampled": "sampled first-token entropy (nats)"}


@dataclass
class RivalryPlan:
    """What every layer shares: the question table, the groups, the strata and the lineage."""

    cfg: RivalryConfig
    layers: list[int]
    questions: np.ndarray
    entropy: np.ndarray
    grouping: Grouping
    distinct: np.ndarray  # D: distinct completions per question
    first_copy: np.ndarray = field(repr=False)  # (Q, S): the first sample of each distinct completion
    correct: np.ndarray | None = None  # per question: at least half of the samples correct
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    n_samples: int = 0
    k: int = 0
    strata_name: str | None = None  # the question variable the calibrated test stratifies by
    strata: np.ndarray | None = None
    state: LakeState | None = None  # the lake as the plan read it: recorded in every result group

    def groups_summary(self) -> dict[str, Any]:
        out = self.grouping.summary(self.entropy)
        if self.state is not None:
            out["captured"] = {"n_done": self.state.n_done, "n_questions": self.state.n_units,
                               "note": self.state.line() or "every question captured"}
        out["entropy"] = self.cfg.entropy
        out["entropy_meaning"] = ENTROPY_NAMES[self.cfg.entropy]
        if self.strata is not None:
            out["strata"] = self.strata_name
            out["composition"] = composition(self.strata, self.grouping.labels)
        return out


def composition(strata: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, int]]:
    """Questions per stratum in each group (left-out questions not counted)."""
    out: dict[str, dict[str, int]] = {}
    for s in np.unique(strata):
        m = strata == s
        out[str(s)] = {g: int((m & (labels == g)).sum()) for g in (AMBIGUOUS, UNAMBIGUOUS)}
    return out


def result_group(cfg: RivalryConfig, layer: int | None = None) -> str:
    return f"rivalry/{cfg.protocol}" if layer is None else f"rivalry/layer_{layer}/{cfg.protocol}"


def resolve_layers(ds: xr.Dataset, layers: list[int] | None) -> list[int]:
    captured = [int(x) for x in ds.layer.values]
    if layers is None:
        return captured
    missing = [x for x in layers if x not in captured]
    if missing:
        raise LayerError(f"layers {missing} are not in the lake (layers {captured})")
    return list(layers)


def question_entropy(ds: xr.Dataset, kind: str) -> np.ndarray:
    if kind == "first_word":
        return first_word_entropy(ds.completion.values)
    return (ds.entropy if kind == "exact" else ds.sample_entropy).values.astype(float)


def resolve_strata(ds: xr.Dataset, strata: str) -> tuple[str | None, np.ndarray | None]:
    """The question variable to stratify by: ``auto`` takes ``relation`` when the lake has more
    than one relation type, ``none`` none; any other name must be a question variable."""
    if strata == "none":
        return None, None
    name = "relation" if strata == "auto" else strata
    if name not in ds or ds[name].dims != ("question",):
        if strata == "auto":
            return None, None
        have = sorted(v for v in ds.data_vars if ds[v].dims == ("question",))
        raise SchemaError(f"--strata {strata}: the lake has no question variable {strata!r} (it has {have})")
    values = np.array([str(v) for v in np.asarray(ds[name].values).ravel()], dtype=object)
    if strata == "auto" and len(set(values) - {""}) < 2:
        return None, None
    return name, values


def plan_rivalry(cfg: RivalryConfig) -> RivalryPlan:
    """Open the lake, check it holds codes, compute the layer-independent question table."""
    ds = open_lake(cfg.ref)
    need = CODES[cfg.protocol][0]
    if need not in ds:
        raise SchemaError(f"{cfg.store} holds no SAE codes ({need}): capture with an SAE first")
    layers = resolve_layers(ds, cfg.layers)
    done = ds.done.values.astype(bool)
    state = LakeState.of(dict(ds.attrs), done).require(cfg.store, "analyse")
    entropy = np.where(done, question_entropy(ds, cfg.entropy), np.nan)
    grouping = entropy_groups(entropy, cfg.rule, cfg.q, cfg.threshold, cfg.high, cfg.low)
    grouping.labels[~done] = NOT_CAPTURED  # not a group of the analysis: not in it at all
    D, first = distinct_rows(ds.completion_ids.values)
    correct = ds.correct.values.mean(axis=1) >= 0.5
    with np.errstate(over="ignore"):
        max_prob = np.exp(ds.first_logprob.values.astype(float)).max(axis=1)
    baselines = {MAX_PROB: max_prob, NEG_ENTROPY: -ds.entropy.values.astype(float)}
    strata_name, strata = resolve_strata(ds, cfg.strata)
    return RivalryPlan(cfg, layers, ds.question.values, entropy, grouping, np.where(done, D, 0), first,
                       np.where(done, correct, False), baselines, dict(ds.attrs), int(ds.sizes["sample"]),
                       int(ds.sizes["k"]), strata_name, strata, state)


