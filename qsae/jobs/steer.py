"""The steering experiment (the rivalry paper's exp2) on a question lake and its rivalry result.

Stages, as a flow composes them: ``plan_steer`` (once: the peak layer, the ambiguous prompts, the
rival pairs from the exp1 correlation matrix, control pairs and random directions, the SAE's
decoder directions, the result group created or resumed) -> ``steer_prompts`` over chunks of
prompts (each prompt: its unsteered greedy completion, then every direction x multiplier in one
batch, ``qsae.lm.steer``; written with its done mark) -> ``finish_steer`` (flip rates, the tests
of ``qsae.analysis.steering``, figures, the summary). ``run_steer`` strings them in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from qsae.analysis.rivalry import AMBIGUOUS, codes_matrix
from qsae.analysis.steering import (
    FlipTests,
    GroupCorrelations,
    Pair,
    control_pairs,
    flip_tests,
    flipped,
    group_correlations,
    random_unit,
    rival_pairs,
    settled_flip,
)
from qsae.errors import DatasetError, LayerError, ResultMissingError
from qsae.jobs import interrupt
from qsae.jobs.codes import load_sae_for
from qsae.jobs.configs import SteerConfig
from qsae.jobs.figures import pyplot
from qsae.jobs.models import Shared, shared_model
from qsae.jobs.progress import Progress
from qsae.jobs.report import Report, fmt
from qsae.lake.results import LakeState, figure_png, jsonable, lake_state, lineage_of, read_result_group, save_png
from qsae.lake.store import consolidate, open_lake
from qsae.lm.models import LoadedModel
from qsae.lm.steer import greedy_conditions

log = logging.getLogger("qsae.jobs.steer")
RIVAL, CONTROL, RANDOM = "rival", "control", "random"


@dataclass
class SteerPlan:
    """What every step shares: the layer, the prompts, the directions and the result group."""

    cfg: SteerConfig
    layer: int
    group: str
    questions: np.ndarray  # the prompts' question ids, lake order
    prompts: list[str]  # their text, the lake's prompt template applied
    kinds: list[str]  # per direction: rival, control or random
    pairs: list[Pair | None]  # per direction (None for a random one)
    directions: np.ndarray = field(repr=False)  # (D, d_model) unit vectors
    multipliers: np.ndarray = field(repr=False)  # the strengths applied (absolute units)
    median_norm: float = float("nan")  # the layer's median prompt-end residual norm
    attrs: dict[str, Any] = field(default_factory=dict)
    state: LakeState | None = None
    identity: str = ""
    done: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, bool))
    pair_random: list[int] = field(default_factory=list)  # paper preset: each pair's own random direction

    @property
    def norm_ratio(self) -> np.ndarray:
        return self.multipliers / self.median_norm if self.median_norm > 0 else np.full(len(self.multipliers), np.nan)


def _peak_layer(by_layer: xr.Dataset) -> int:
    """The paper's rule: the layer with the largest p5_unambiguous - p5_ambiguous."""
    gap = by_layer["p5_unambiguous"].values - by_layer["p5_ambiguous"].values
    if not np.isfinite(gap).any():
        raise ResultMissingError("the rivalry result has no layer with both groups' p5: no peak layer; pass --layer")
    return int(by_layer.layer.values[int(np.nanargmax(gap))])


def _template(attrs: dict[str, Any]) -> str:
    return str(attrs.get("prompt_template") or "Q: {question}\nA:")


def plan_steer(cfg: SteerConfig) -> SteerPlan:
    """Read the lake and its rivalry result (proven: complete and of the lake as it is), choose the
    layer, prompts, rival pairs, controls and random directions; create or resume the result group."""
    ds = open_lake(cfg.ref)
    state = lake_state(ds).require(cfg.store, "steer")
    hint = f"qsae rivalry {cfg.store}"
    by_layer = read_result_group(cfg.ref, "rivalry/paper", state, rerun=hint).load()
    layers = [int(x) for x in by_layer.layer.values]
    layer = cfg.layer if cfg.layer is not None else _peak_layer(by_layer)
    if layer not in layers:
        raise LayerError(f"layer {layer} has no rivalry result (the result has layers {layers}): run `{hint} --layer "
                         f"{layer}` or choose one of them")
    per_q = read_result_group(cfg.ref, f"rivalry/layer_{layer}/paper", state, rerun=hint)
    amb = np.flatnonzero(per_q.group.values == AMBIGUOUS)
    if amb.size == 0:
        raise DatasetError(f"the rivalry result at layer {layer} has no ambiguous question: nothing to steer")
    attrs = dict(ds.attrs)
    params = (per_q.attrs.get("summary") or {}).get("params", {}).get("paper", {})
    codes = ds[["prompt_codes_idx", "prompt_codes_val"]].sel(layer=layer).isel(question=amb).load()
    X = codes_matrix(codes.prompt_codes_idx.values, codes.prompt_codes_val.values, int(attrs["d_sae"]))
    g = group_correlations(X, params.get("min_mean", 0.01), params.get("max_features", 300),
                           params.get("feature_seed", 42))
    rng = np.random.default_rng([cfg.seed, 1])
    rivals = _rivals(cfg, g, rng)
    paper = cfg.preset == "paper"
    controls = [] if paper else control_pairs(g, rivals, cfg.controls, rng)
    sae = load_sae_for(attrs, layer, cfg.sae)
    W = sae.W_dec.detach().double().cpu().numpy()  # (d_sae, d_model)
    d = W.shape[1]

    def diff(p: Pair) -> np.ndarray:
        v = W[p.feature_i] - W[p.feature_j]
        return v / max(np.linalg.norm(v), 1e-12)

    kinds = [RIVAL] * len(rivals) + [CONTROL] * len(controls)
    pairs: list[Pair | None] = [*rivals, *controls]
    dirs = [diff(p) for p in pairs]
    n_random = len(rivals) if paper else cfg.randoms
    random_rng = np.random.default_rng([cfg.seed, 2])
    dirs += [random_unit(random_rng, d, paper=True) for _ in range(n_random)]
    kinds += [RANDOM] * n_random
    pairs += [None] * n_random
    norms = ds["resid_prompt_norm"].sel(layer=layer).values[np.isfinite(per_q.entropy.values)]
    median = float(np.nanmedian(norms)) if norms.size else float("nan")
    mult = np.asarray(cfg.multipliers, float) * (median if cfg.units == "norm" else 1.0)
    chosen = amb if cfg.prompts is None else amb[: cfg.prompts]
    questions = ds.question.values[chosen]
    texts = ds.question_text.values[chosen]
    template = _template(attrs)
    prompts = [template.format(question=str(t)) if "{question}" in template else str(t) for t in texts]
    plan = SteerPlan(cfg, layer, f"steer/layer_{layer}/{cfg.preset}", questions, prompts, kinds, pairs,
                     np.asarray(dirs), mult, median, attrs, state,
                     pair_random=list(range(len(rivals) + len(controls), len(kinds))) if paper else [])
    plan.identity = _identity(plan)
    plan.done = _open_or_create(plan)
    log.info("steering layer %d: %d rival pairs, %d control pairs, %d random directions x %d multipliers on %d "
             "prompts (%d done before)", layer, len(rivals), len(controls), n_random, len(mult), len(prompts),
             int(plan.done.sum()))
    return plan


def _rivals(cfg: SteerConfig, g: GroupCorrelations, rng: np.random.Generator) -> list[Pair]:
    if cfg.rivals == "top":
        return rival_pairs(g, cfg.top_pairs)[: cfg.pairs]
    out, F = [], g.features.size  # the level check: random pairs of the group's features as "rivals"
    seen = set()
    while len(out) < min(cfg.pairs, F * (F - 1) // 2):
        a, b = sorted(rng.choice(F, 2, replace=False).tolist())
        if (a, b) not in seen:
            seen.add((a, b))
            out.append(Pair(int(g.features[a]), int(g.features[b]), float(g.corr[a, b]), float(g.frequency[a]),
                            float(g.frequency[b])))
    return out


def _identity(plan: SteerPlan) -> str:
    """What fixes the result: the run's parameters, the lake's lineage and state, the prompts and
    the directions (a resume continues only a run with all of them the same)."""
    c = plan.cfg
    ident = {"params": c.model_dump(exclude={"device", "dtype", "rows_per_batch", "prompts_per_step", "store",
                                             "storage_options"}),
             "lineage": lineage_of(plan.attrs), "state": plan.state.record() if plan.state else None,
             "questions": plan.questions.tolist(), "directions": hashlib.sha256(plan.directions.tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(jsonable(ident), sort_keys=True).encode()).hexdigest()[:16]


def _group(plan: SteerPlan, mode: str = "r+") -> zarr.Group:
    ref = plan.cfg.ref / plan.group
    return zarr.open_group(store=ref.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3,
                           use_consolidated=False)


def _open_or_create(plan: SteerPlan) -> np.ndarray:
    """Resume the result group when it was made by this very run (its identity), else create it:
    every array chunked one prompt at a time, so a prompt's region is its own chunks."""
    try:
        grp = _group(plan)
        if grp.attrs.get("identity") == plan.identity:
            return np.asarray(grp["done"][:], bool)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        pass
    D, M, P = len(plan.kinds), len(plan.multipliers), len(plan.prompts)
    lake_root = zarr.open_group(store=plan.cfg.ref.zarr_store(), mode="r+", zarr_format=3, use_consolidated=False)
    parent = plan.group.rsplit("/", 1)[0]
    lake_root.require_group(parent)  # the parents are groups too, as xarray makes them
    root = zarr.open_group(store=(plan.cfg.ref / plan.group).zarr_store(), mode="w", zarr_format=3)
    codecs = {"compressors": [ZstdCodec(level=3), Crc32cCodec()], "config": {"write_empty_chunks": True}}

    def array(name, dims, dtype, fill, shape, chunks, values=None):
        a = root.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, dimension_names=dims,
                              **codecs)
        if values is not None:
            a[...] = values
        return a

    array("prompt", ["prompt"], "int64", 0, (P,), (max(P, 1),), plan.questions.astype(np.int64))
    array("direction", ["direction"], "int32", 0, (D,), (max(D, 1),), np.arange(D, dtype=np.int32))
    array("multiplier", ["multiplier"], "float64", 0.0, (M,), (M,), np.asarray(plan.cfg.multipliers, float))
    array("strength", ["multiplier"], "float64", 0.0, (M,), (M,), plan.multipliers)
    array("kind", ["direction"], str, "", (D,), (max(D, 1),), np.array(plan.kinds, dtype=object))
    for name, get in (("feature_i", lambda p: p.feature_i), ("feature_j", lambda p: p.feature_j)):
        array(name, ["direction"], "int64", -1, (D,), (max(D, 1),), np.array([-1 if p is None else get(p)
                                                                             for p in plan.pairs]))
    for name, get in (("correlation", lambda p: p.correlation), ("frequency_i", lambda p: p.frequency_i),
                      ("frequency_j", lambda p: p.frequency_j)):
        array(name, ["direction"], "float64", np.nan, (D,), (max(D, 1),),
              np.array([np.nan if p is None else get(p) for p in plan.pairs]))
    dmp = ["direction", "multiplier", "prompt"]
    array("flipped", dmp, "bool", False, (D, M, P), (max(D, 1), M, 1))
    array("text", dmp, str, "", (D, M, P), (max(D, 1), M, 1))
    array("first_kl", dmp, "float32", np.nan, (D, M, P), (max(D, 1), M, 1))
    array("first_entropy_change", dmp, "float32", np.nan, (D, M, P), (max(D, 1), M, 1))
    array("baseline_text", ["prompt"], str, "", (P,), (1,))
    array("baseline_entropy", ["prompt"], "float64", np.nan, (P,), (1,))
    array("done", ["prompt"], "bool", False, (P,), (1,))
    root.attrs.update(jsonable({"identity": plan.identity, "kind": "steer", "layer": plan.layer,
                                "lineage": lineage_of(plan.attrs), "params": plan.cfg.model_dump()}))
    return np.zeros(P, bool)


# ------------------------------------------------------------------------ steps
def _model(cfg: SteerConfig, attrs: dict[str, Any]) -> Shared:
    name = cfg.model or attrs.get("model_path") or attrs.get("model")
    return shared_model(str(name), device=cfg.device, dtype=cfg.dtype)


def steer_prompts(plan: SteerPlan, prompts: list[int], lm: LoadedModel | None = None, progress: bool = False) -> int:
    """Steer the given prompts (indices into the plan's) not yet done: per prompt its unsteered
    greedy completion, then every direction x multiplier in batches, written with its done mark."""
    cfg = plan.cfg
    todo = [i for i in prompts if not plan.done[i]]
    if not todo:
        return 0
    shared = Shared(lm, threading.Lock()) if lm is not None else _model(cfg, plan.attrs)
    with shared.lock:  # the steering hook is the model's: one step at a time on it
        return _steer_prompts(plan, todo, shared.lm, progress)


def _steer_prompts(plan: SteerPlan, todo: list[int], lm: LoadedModel, progress: bool) -> int:
    cfg = plan.cfg
    tok, model = lm.tokenizer, lm.model
    stop = [t for t in {tok.eos_token_id} if t is not None]
    dev = next(model.parameters()).device
    D, M = len(plan.kinds), len(plan.multipliers)
    vectors = torch.from_numpy((plan.directions[:, None, :] * plan.multipliers[None, :, None]).reshape(D * M, -1))
    vectors = vectors.to(dev, dtype=next(model.parameters()).dtype)
    zero = torch.zeros((1, vectors.shape[1]), dtype=vectors.dtype, device=dev)
    early = cfg.early_exit and not getattr(tok, "clean_up_tokenization_spaces", False)
    grp = _group(plan)
    with Progress(len(todo), f"steering layer {plan.layer}", "prompts", bar=progress, logger=log) as bar:
        for i in todo:
            interrupt.check(f"before prompt {i}")
            ids = tok(plan.prompts[i], add_special_tokens=True).input_ids
            base = greedy_conditions(model, ids, zero, plan.layer, cfg.max_new_tokens, stop, keep_logprobs=True)
            base_text = tok.decode(base.tokens[0][base.tokens[0] >= 0].tolist(), skip_special_tokens=True)
            ref = torch.from_numpy(base.first_logprobs)

            def settled(row: int, so_far: list[int]) -> bool:
                return settled_flip(tok.decode(so_far, skip_special_tokens=True), base_text)

            texts, kl, ent = [], [], []
            for a in range(0, D * M, cfg.rows_per_batch):
                out = greedy_conditions(model, ids, vectors[a:a + cfg.rows_per_batch], plan.layer, cfg.max_new_tokens,
                                        stop, settled=settled if early else None, reference_logprobs=ref)
                texts += [tok.decode(r[r >= 0].tolist(), skip_special_tokens=True) for r in out.tokens]
                kl.append(out.first_kl)
                ent.append(out.first_entropy - base.first_entropy[0])
            with interrupt.working():  # a prompt is written whole, then marked done
                flips = np.array([flipped(t, base_text) for t in texts]).reshape(D, M)
                grp["flipped"][:, :, i] = flips
                grp["text"][:, :, i] = np.array(texts, dtype=object).reshape(D, M)
                grp["first_kl"][:, :, i] = np.concatenate(kl).reshape(D, M).astype(np.float32)
                grp["first_entropy_change"][:, :, i] = np.concatenate(ent).reshape(D, M).astype(np.float32)
                grp["baseline_text"][i] = base_text
                grp["baseline_entropy"][i] = float(base.first_entropy[0])
                grp["done"][i] = True
            plan.done[i] = True
            bar.update()
    return len(todo)


# ----------------------------------------------------------------------- finish
@dataclass
class SteerResult(Report):
    """The steering experiment's result: per direction and multiplier its flip rate, the tests,
    the paper's table, cautions, figures."""

    store: str
    group: str
    layer: int
    preset: str
    multipliers: list[float]
    norm_ratio: list[float]
    n_prompts: int
    flip_rate: dict[str, np.ndarray] = field(repr=False)  # kind -> (directions of that kind, M)
    pairs: list[Pair] = field(default_factory=list)
    tests: FlipTests | None = None
    paper_rows: list[dict[str, Any]] = field(default_factory=list)
    headline: str = ""
    cautions: list[str] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)
    images: dict[str, bytes] = field(repr=False, default_factory=dict)
    median_norm: float = float("nan")
    units: str = "absolute"

    def to_dict(self) -> dict[str, Any]:
        out = {"store": self.store, "group": self.group, "layer": self.layer, "preset": self.preset,
               "multipliers": self.multipliers, "units": self.units, "median_prompt_norm": self.median_norm,
               "norm_ratio": self.norm_ratio, "total_prompts": self.n_prompts, "headline": self.headline,
               "results": self.paper_rows, "cautions": self.cautions, "figures": self.figures,
               "flip_rate": {k: v.tolist() for k, v in self.flip_rate.items()},
               "pairs": [p.to_dict() for p in self.pairs]}
        if self.tests is not None:
            out["tests"] = self.tests.to_dict()
        return out

    def to_text(self) -> str:
        lines = [f"steering at layer {self.layer} ({self.preset} preset) of {self.store}: {len(self.pairs)} rival pairs "
                 f"on {self.n_prompts} ambiguous prompts", self.headline]
        unit = "x median |resid|" if self.units == "norm" else "(absolute)"
        for j, m in enumerate(self.multipliers):
            rates = {k: float(v[:, j].mean()) if v.size else float("nan") for k, v in self.flip_rate.items()}
            line = (f"  multiplier {fmt(m)} {unit} (= {fmt(self.norm_ratio[j])} x the median prompt-end norm "
                    f"{fmt(self.median_norm)}): flip rate rival {fmt(rates.get(RIVAL))}, random "
                    f"{fmt(rates.get(RANDOM))}" + (f", control {fmt(rates.get(CONTROL))}" if CONTROL in rates else ""))
            if self.tests is not None and self.tests.reason is None:
                line += (f"; across pairs p = {_p(self.tests.p_greater[j], self.tests.resolution)} (Holm "
                         f"{fmt(self.tests.p_holm[j])})")
            lines.append(line)
        lines += [f"caution: {c}" for c in self.cautions]
        lines.append(f"results: {self.store} group {self.group!r}; figures: {', '.join(self.figures.values()) or 'none'}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        lines = [f"# Steering at layer {self.layer} ({self.preset} preset)", "", f"store `{self.store}`, group "
                 f"`{self.group}`; {len(self.pairs)} rival pairs on {self.n_prompts} ambiguous prompts", "",
                 f"**{self.headline}**", "", "| feature_i | feature_j | correlation | multiplier | flip_rate_B | "
                 "flip_rate_random | control flip rate | p vs controls |", "|---|---|---|---|---|---|---|---|"]
        for r in self.paper_rows:
            lines.append(f"| {r['feature_i']} | {r['feature_j']} | {fmt(r['correlation'])} | {fmt(r['multiplier'])} | "
                         f"{fmt(r['flip_rate_B'])} | {fmt(r['flip_rate_random'])} | {fmt(r.get('flip_rate_control'))} | "
                         f"{fmt(r.get('p_vs_controls'))} |")
        lines += [""] + [f"- caution: {c}" for c in self.cautions]
        for key, png in self.images.items():
            import base64

            lines += ["", f"## {key.replace('_', ' ')}", f"![{key}](data:image/png;base64,{base64.b64encode(png).decode()})"]
        return "\n".join(lines)


def _p(p: float, res: float) -> str:
    return f"<= {fmt(res)}" if p <= res * (1 + 1e-9) else fmt(p)


def finish_steer(plan: SteerPlan) -> SteerResult:
    """Flip rates over the done prompts, the tests, the paper's rows, figures, the summary."""
    cfg = plan.cfg
    path, opts = cfg.ref.xarray_target()
    ds = xr.open_zarr(path, group=plan.group, storage_options=opts or None, consolidated=False).load()
    done = ds.done.values.astype(bool)
    if not done.any():
        raise DatasetError(f"{plan.group}: no prompt was steered yet: run the steps first")
    rate = ds.flipped.values[:, :, done].mean(axis=2)  # (D, M)
    kinds = np.asarray(plan.kinds)
    by = {k: rate[kinds == k] for k in (RIVAL, CONTROL, RANDOM) if (kinds == k).any()}
    rivals = [p for p, k in zip(plan.pairs, plan.kinds) if k == RIVAL]
    tests = None
    if cfg.preset == "calibrated":
        tests = flip_tests(by.get(RIVAL, np.zeros((0, len(plan.multipliers)))),
                           by.get(CONTROL, np.zeros((0, len(plan.multipliers)))), list(cfg.multipliers), cfg.n_perm,
                           cfg.seed)
    rows = []
    for a, p in enumerate(rivals):
        for j, m in enumerate(cfg.multipliers):
            rnd = rate[plan.pair_random[a], j] if plan.pair_random else float(by.get(RANDOM, rate[:0])[:, j].mean()
                                                                                  if RANDOM in by else np.nan)
            row = {"feature_i": p.feature_i, "feature_j": p.feature_j, "correlation": p.correlation, "multiplier": m,
                   "flip_rate_B": float(by[RIVAL][a, j]), "flip_rate_random": float(rnd),
                   "total_prompts": int(done.sum())}
            if tests is not None and tests.reason is None:
                row["flip_rate_control"] = float(by[CONTROL][:, j].mean())
                row["p_vs_controls"] = float(tests.pair_p[a, j])
            rows.append(row)
    low = [r for r in rows if r["multiplier"] == cfg.multipliers[0]]
    if RANDOM in by:
        above = sum(r["flip_rate_B"] > r["flip_rate_random"] for r in low)
        headline = (f"more flips than random at the lowest multiplier ({fmt(cfg.multipliers[0])}) in {above} of "
                    f"{len(low)} pairs")
    else:
        headline = "no random directions"
    if tests is not None and tests.reason is None:
        j = 0
        headline += (f"; rival pairs vs {tests.n_controls} frequency-matched control pairs there: mean flip excess "
                     f"{fmt(tests.statistic[j])}, p = {_p(tests.p_greater[j], tests.resolution)}")
    res = SteerResult(cfg.store, plan.group, plan.layer, cfg.preset, list(cfg.multipliers),
                      [float(x) for x in plan.norm_ratio], int(done.sum()), by, rivals, tests, rows, headline,
                      _cautions(plan, int(done.sum())), median_norm=plan.median_norm, units=cfg.units)
    for key, make in (("flip_rates", lambda: flip_figure(res)), ("excess_vs_correlation", lambda: excess_figure(res))):
        fig = make()
        res.images[key] = figure_png(fig)
        res.figures[key] = save_png(res.images[key], cfg.ref, f"{plan.group}/{key}.png")
        pyplot().close(fig)
    with interrupt.working():
        grp = _group(plan)
        grp.attrs.update(jsonable({"summary": res.to_dict(), "lake_state": plan.state.record() if plan.state else None}))
        consolidate(cfg.ref)
    return res


def _cautions(plan: SteerPlan, n: int) -> list[str]:
    out = []
    if n < 20:
        out.append(f"{n} prompts: a flip rate moves in steps of {fmt(1 / max(n, 1))}; the rates say little")
    for m, r in zip(plan.cfg.multipliers, plan.norm_ratio):
        if np.isfinite(r) and r < 0.05:
            out.append(f"multiplier {fmt(m)} is {fmt(r)} x the layer's median prompt-end residual norm "
                       f"({fmt(plan.median_norm)}): it barely moves the residual")
        elif np.isfinite(r) and r > 2:
            out.append(f"multiplier {fmt(m)} is {fmt(r)} x the layer's median prompt-end residual norm "
                       f"({fmt(plan.median_norm)}): it swamps the residual, any direction flips the answer")
    if plan.cfg.preset == "paper":
        out.append("paper preset: one random direction per pair, no control pairs: no p-value (the calibrated "
                   "preset tests against frequency-matched control pairs)")
    return out


def flip_figure(res: SteerResult):
    """Flip rate vs multiplier: each rival pair against the controls' and random directions' bands."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    m = np.asarray(res.multipliers)
    for kind, color in ((CONTROL, "tab:blue"), (RANDOM, "0.5")):
        v = res.flip_rate.get(kind)
        if v is not None and v.size:
            ax.fill_between(m, np.quantile(v, 0.1, axis=0), np.quantile(v, 0.9, axis=0), color=color, alpha=0.25,
                            label=f"{kind} (10-90%)")
    for i, v in enumerate(res.flip_rate.get(RIVAL, np.zeros((0, m.size)))):
        ax.plot(m, v, "-o", color="tab:red", alpha=0.6, lw=1, label="rival pairs" if i == 0 else None)
    ax.set_xlabel("multiplier" + (" (x median prompt-end |resid|)" if res.units == "norm" else ""))
    ax.set_ylabel("flip rate (greedy answer changed)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"steering at layer {res.layer} ({res.n_prompts} prompts)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def excess_figure(res: SteerResult):
    """Each rival pair's flip excess over the controls (or random) against its correlation."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    base = res.flip_rate.get(CONTROL) if CONTROL in res.flip_rate else res.flip_rate.get(RANDOM)
    corr = np.array([p.correlation for p in res.pairs])
    for j, m in enumerate(res.multipliers):
        ref = base[:, j].mean() if base is not None and base.size else 0.0
        ax.scatter(corr, res.flip_rate[RIVAL][:, j] - ref, s=18, label=f"multiplier {fmt(m)}")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("pair correlation (ambiguous group)")
    ax.set_ylabel("flip rate - " + ("control" if CONTROL in res.flip_rate else "random") + " flip rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_steer(cfg: SteerConfig, progress: bool = False, lm: LoadedModel | None = None) -> SteerResult:
    """Plan, every pending prompt, finish: the whole experiment in-process (what a notebook calls)."""
    plan = plan_steer(cfg)
    steer_prompts(plan, list(range(len(plan.prompts))), lm=lm, progress=progress)
    return finish_steer(plan)
