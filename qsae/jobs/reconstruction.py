"""The reconstruction study: plan -> a step per layer -> finish, written into the lake.

On a question lake the stored codes are evaluated at each stored position separately (the
prompt's end: one row per question; the completions' ends: n_samples near-duplicate rows per
question), never pooled, and labelled as such: neither is SAEBench's setting. On a token lake
of text (``qsae collect``) the named SAE encodes every non-special token: SAEBench's core
metrics, comparable with its numbers (``comparable_to_saebench`` in the result's attrs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr

from qsae.errors import LayerError, SAEFormatError
from qsae.jobs import interrupt
from qsae.jobs.codes import load_sae_for
from qsae.jobs.configs import ReconstructionConfig
from qsae.jobs.figures import pyplot
from qsae.jobs.progress import Progress
from qsae.jobs.report import Report, fmt
from qsae.lake.results import LakeState, lake_state, lineage_of, save_figure, write_result_group
from qsae.lake.schema import KIND_QUESTIONS, KIND_TOKENS
from qsae.lake.store import open_lake
from qsae.lm.hooks import splice
from qsae.sae.formats import load_sae
from qsae.sae.metrics import LossAccumulator, LossRecovered, ReconAccumulator, decode_codes
from qsae.sae.model import SAE

log = logging.getLogger("qsae.jobs.reconstruction")
RESULT_GROUP = "reconstruction"




# Each position a lake offers, labelled: only a token lake's is comparable with SAEBench's core metrics.
POSITION_LABELS = {
    "prompt": ("prompt_end", "the last prompt token of each finished question (one row per question)"),
    "completion": ("completion_end", "the last token of each sampled completion (n_samples rows per question, "
                                     "near-duplicates of each other)"),
    "token": ("token", "every token of the text corpus (BOS/EOS/pad left out unless include_special): "
                       "comparable with SAEBench's core metrics"),
}


@dataclass
class ReconstructionPlan:
    """What every layer shares: the lake's kind and lineage, the layers and the positions."""

    cfg: ReconstructionConfig
    kind: str
    layers: list[int]
    positions: list[str]  # keys of POSITION_LABELS
    attrs: dict[str, Any] = field(default_factory=dict)
    state: LakeState | None = None  # the lake as the plan read it (recorded in the result group)

    @property
    def labels(self) -> list[str]:
        return [POSITION_LABELS[p][0] for p in self.positions]


@dataclass
class LayerMetrics:
    """One layer's offline metrics and feature densities, per position label."""

    layer: int
    metrics: dict[str, dict[str, float]]
    density: dict[str, np.ndarray] = field(repr=False)
    sae_sha256: str = ""


@dataclass
class ReconstructionResult(Report):
    """The metrics table (layer x position), its figure and where they were written."""

    table: xr.Dataset
    figure: str | None
    store: str = ""

    def rows(self) -> list[dict[str, Any]]:
        return table_rows(self.table)

    def cautions(self) -> list[str]:
        """What a number in the table does not say, in words (negative FVE, too few rows for 'dead')."""
        out = []
        d_sae = int(self.table.sizes.get("feature", 0))
        for r in self.rows():
            where = f"layer {r['layer']} {r['position']}"
            if r["fve"] < 0:
                out.append(f"{where}: FVE {fmt(r['fve'])} is negative: the squared error is {fmt(1 - r['fve'])}x "
                           "the rows' variance around their mean. These rows barely vary (the prompt's last token "
                           "is the same template token for every question), so FVE divides by a small number; "
                           f"the cosine ({fmt(r['cossim'])}) and l2_ratio ({fmt(r['l2_ratio'])}) read better here.")
            firings = r["n_tokens"] * r["l0"]
            if d_sae and r["dead_features"] > 0 and firings < 10 * d_sae:
                out.append(f"{where}: {fmt(int(r['dead_features']))} of {fmt(d_sae)} features did not fire in "
                           f"these {fmt(int(r['n_tokens']))} rows ({fmt(int(firings))} firings in all, under 10 per "
                           "feature): that shows no feature dead. Count dead features on many more rows (a token "
                           "lake from `qsae collect`).")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "group": RESULT_GROUP, "figure": self.figure, "rows": self.rows(),
                "captured": self.table.attrs.get("captured"),
                "positions": dict(self.table.attrs.get("positions") or {}),
                "comparable_to_saebench": bool(self.table.attrs.get("comparable_to_saebench")),
                "cautions": self.cautions()}

    def to_text(self) -> str:
        rows, d_sae = self.rows(), int(self.table.sizes.get("feature", 0))
        kind = "token lake: comparable with SAEBench" if self.table.attrs.get("comparable_to_saebench") else \
            "question lake: not comparable with SAEBench's text-token metrics"
        lines = [f"SAE reconstruction of {self.store} ({kind})"] + (
            [self.table.attrs["captured"]] if self.table.attrs.get("captured") else []) + [
                 f"{'layer':>5}  {'position':<15} {'rows':>7} {'FVE':>7} {'cos':>6} {'L0':>6} "
                 f"{'dead (of ' + fmt(d_sae) + ')':>15}"]
        for r in rows:
            lines.append(f"{r['layer']:>5}  {r['position']:<15} {fmt(int(r['n_tokens'])):>7} {fmt(r['fve']):>7} "
                         f"{fmt(r['cossim']):>6} {fmt(r['l0']):>6} {fmt(int(r['dead_features'])):>15}")
        for layer in self.table.layer.values if "loss_recovered" in self.table else []:
            t = self.table.sel(layer=layer)
            lines.append(f"layer {int(layer)} with the model in the loop: loss recovered "
                         f"{fmt(float(t.loss_recovered))}, KL score {fmt(float(t.kl_div_score))} "
                         f"({fmt(int(t.model_tokens_scored))} text tokens)")
        lines += [f"{k}: {v}" for k, v in (self.table.attrs.get("positions") or {}).items()]
        lines += [f"caution: {c}" for c in self.cautions()]
        lines.append(f"results: {self.store} group {RESULT_GROUP!r}; figure: {self.figure}; --json for every column")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        labels = self.table.attrs.get("positions") or {}
        return "\n".join(
            [f"# Reconstruction metrics\n\nstore `{self.store}`, group `{RESULT_GROUP}`, figure `{self.figure}`", ""]
            + ([f"**{self.table.attrs['captured']}**", ""] if self.table.attrs.get("captured") else [])
            + [f"- **{k}**: {v}" for k, v in labels.items()]
            + ["", "Comparable with SAEBench's core metrics: " + ("yes (text tokens)" if self.table.attrs.get(
                "comparable_to_saebench") else "no (question-lake positions)")]
            + ([""] + [f"- caution: {c}" for c in self.cautions()] if self.cautions() else []))


def plan_reconstruction(cfg: ReconstructionConfig) -> ReconstructionPlan:
    """Open the lake once: its kind, the layers (all captured by default) and the positions."""
    ds = open_lake(cfg.ref)
    attrs = dict(ds.attrs)
    captured = [int(x) for x in ds.layer.values]
    layers = cfg.layers or captured
    missing = [layer for layer in layers if layer not in captured]
    if missing:
        raise LayerError(f"layers {missing} are not in the lake (layers {captured})")
    kind = attrs.get("kind", KIND_QUESTIONS)
    if kind == KIND_TOKENS:
        if not cfg.sae:
            raise SAEFormatError(f"{cfg.store} is a token lake: it holds no codes, so name the SAE to evaluate (sae=)")
        positions = ["token"]
    else:
        if "codes_idx" not in ds:
            raise SAEFormatError(f"{cfg.store} holds no SAE codes (captured without an SAE)")
        positions = ["prompt", "completion"] if cfg.positions == "both" else [cfg.positions]
    state = lake_state(ds).require(cfg.store, "reconstruct")
    return ReconstructionPlan(cfg, kind, layers, positions, attrs, state)


def _question_rows(ds: xr.Dataset, layer: int, block: slice, position: str):
    """(x, idx, val, left_out) of one question block at one position: done, finite rows only."""
    sel = ds.isel(question=block)
    done = sel.done.values
    if position == "completion":
        v = sel[["resid", "codes_idx", "codes_val", "resid_nonfinite"]].sel(layer=layer).load()
        ok = done[:, None] & (v.resid_nonfinite.values == 0)
        return v.resid.values[ok], v.codes_idx.values[ok], v.codes_val.values[ok], int((done[:, None] & ~ok).sum())
    v = sel[["resid_prompt", "prompt_codes_idx", "prompt_codes_val", "resid_prompt_nonfinite"]].sel(layer=layer).load()
    ok = done & (v.resid_prompt_nonfinite.values == 0)
    return v.resid_prompt.values[ok], v.prompt_codes_idx.values[ok], v.prompt_codes_val.values[ok], int((done & ~ok).sum())


def _token_rows(ds: xr.Dataset, layer: int, block: slice, include_special: bool):
    """(x, left_out) of one token block: done, finite, and (by default) not special."""
    sel = ds.isel(token=block)
    v = sel[["acts", "nonfinite"]].sel(layer=layer).load()
    keep = sel.done.values & (include_special | ~sel.special.values)
    ok = keep & (v.nonfinite.values == 0)
    return v.acts.values[ok], int((keep & ~ok).sum())


def encode_rows(sae: SAE, x: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_hat, idx, val) of rows through the SAE as its format says: exactly its k codes for a
    TopK SAE, every active feature for a ReLU SAE (dense, then the non-zero ones kept)."""
    with torch.inference_mode():
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        if sae.info.activation == "topk":
            idx, val = sae.encode_topk(xt)
            x_hat = sae.decode_sparse(idx, val)
            return x_hat.float().cpu().numpy(), idx.cpu().numpy(), val.float().cpu().numpy()
        z = sae.encode(xt)
        x_hat = sae.decode(z).float().cpu().numpy()
        width = max(int((z != 0).sum(-1).max()) if z.numel() else 0, 1)
        _, idx = z.abs().topk(width, dim=-1)
        return x_hat, idx.cpu().numpy(), z.gather(-1, idx).float().cpu().numpy()


def _accumulate(rows, d_sae: int, d_model: int, encode) -> tuple[dict[str, float], np.ndarray]:
    """Two passes over ``rows()`` (a fresh iterator of (x, idx, val, left_out) each call):
    the mean first, then every metric (``encode`` fills in x_hat, or idx/val when None)."""
    total, n, left_out = np.zeros(d_model), 0, 0
    for x, _, _, bad in rows():
        total += x.astype(np.float64).sum(0)
        n += x.shape[0]
        left_out += bad
    if n == 0:
        raise ValueError("no rows to evaluate (no finished, finite rows at this position)")
    acc = ReconAccumulator(d_sae, total / n)
    for x, idx, val, _ in rows():
        x_hat, idx, val = encode(x, idx, val)
        acc.add(x, x_hat, idx, val)
    out = acc.metrics(d_model)
    out["nonfinite_rows_left_out"] = left_out
    return out, acc.density.astype(np.float32)


def offline_layer(plan: ReconstructionPlan, layer: int) -> LayerMetrics:
    """One layer's offline metrics at each position (the mapped step; reads only this layer)."""
    cfg = plan.cfg
    ds = open_lake(cfg.ref)
    d_model = ds.sizes["d_model"]
    metrics, density = {}, {}
    if plan.kind == KIND_TOKENS:
        sae = load_sae(cfg.sae, layer=layer, k=cfg.sae_k, device=cfg.device)
        if sae.info.hook != plan.attrs.get("hook"):
            raise SAEFormatError(f"the SAE at {sae.info.source} reads {sae.info.hook}, the token lake holds "
                                 f"{plan.attrs.get('hook')} activations")
        if sae.d_model != d_model:
            raise SAEFormatError(f"the SAE's d_model={sae.d_model} differs from the lake's d_model={d_model}")
        blocks = blocks_of(ds.sizes["token"], cfg.block_tokens)

        def rows():
            for b in blocks:
                x, bad = _token_rows(ds, layer, b, cfg.include_special)
                yield x, None, None, bad

        m, dens = _accumulate(rows, sae.d_sae, d_model, lambda x, i, v: encode_rows(sae, x, cfg.device))
        label = POSITION_LABELS["token"][0]
        metrics[label], density[label] = m, dens
        return LayerMetrics(layer, metrics, density, sae.info.sha256)
    sae = load_sae_for(plan.attrs, layer, cfg.sae, cfg.device)
    blocks = blocks_of(ds.sizes["question"], cfg.block_questions)
    for position in plan.positions:
        def rows(position: str = position):
            for b in blocks:
                yield _question_rows(ds, layer, b, position)

        m, dens = _accumulate(rows, sae.d_sae, d_model, lambda x, i, v: (decode_codes(sae, i, v), i, v))
        label = POSITION_LABELS[position][0]
        metrics[label], density[label] = m, dens
    return LayerMetrics(layer, metrics, density, sae.info.sha256)


def blocks_of(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def text_windows(model_lm, cfg: ReconstructionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of the text dataset (BOS first) and the mask of positions to splice and score."""
    from qsae.lm.datasets import load_texts
    from qsae.lm.windows import make_windows

    win = make_windows(load_texts(cfg.text_dataset), model_lm.tokenizer, cfg.context_length, bos="prepend",
                       max_tokens=cfg.max_tokens)
    keep = np.concatenate([np.zeros((win.inputs.shape[0], 1), bool), ~win.special], axis=1)
    return torch.from_numpy(win.inputs), torch.from_numpy(keep)


def _load_lm(plan: ReconstructionPlan):
    from qsae.lm.models import load_model

    cfg, attrs = plan.cfg, plan.attrs
    return load_model(cfg.model or attrs.get("model_path") or attrs["model"], device=cfg.device, dtype=cfg.dtype)


def model_layer(plan: ReconstructionPlan, layer: int, lm=None, progress: bool = False) -> dict[str, float]:
    """CE loss recovered and KL for one layer with the model in the loop (the SAE spliced in at
    its hook: the residual after the layer, or the layer's MLP output); three forward passes
    per batch of windows, so it says how far it is (a bar, or log lines with an ETA)."""
    cfg = plan.cfg
    lm = lm or _load_lm(plan)
    if plan.kind == KIND_TOKENS:
        sae = load_sae(cfg.sae, layer=layer, k=cfg.sae_k, device=str(lm.device))
    else:
        sae = load_sae_for(plan.attrs, layer, cfg.sae, str(lm.device))
    windows, keep = text_windows(lm, cfg)
    with Progress(windows.shape[0], f"layer {layer} with the model in the loop", "windows", bar=progress,
                  logger=log) as bar:
        return loss_recovered(lm.model, sae, layer, windows, keep, batch=cfg.batch_windows,
                              on_batch=bar.update).as_dict()


def finish_reconstruction(plan: ReconstructionPlan, offline: list[LayerMetrics],
                          model: list[dict[str, float]] | None = None) -> ReconstructionResult:
    """The table (layer x position; model-in-the-loop metrics by layer), written with its figure."""
    cfg, labels = plan.cfg, plan.labels
    by_layer = {r.layer: r for r in offline}
    rows = [by_layer[layer] for layer in plan.layers]
    names = list(rows[0].metrics[labels[0]])
    table = xr.Dataset(
        {k: (("layer", "position"), np.array([[r.metrics[p][k] for p in labels] for r in rows], dtype=float))
         for k in names},
        coords={"layer": plan.layers, "position": labels})
    table["feature_density"] = (("layer", "position", "feature"),
                                np.stack([np.stack([r.density[p] for p in labels]) for r in rows]))
    if model:  # by layer: scored on the text windows, whatever the positions above
        for k in model[0]:
            name = "model_tokens_scored" if k == "n_tokens" else k  # not the offline rows' n_tokens
            table[name] = ("layer", np.array([m[k] for m in model], dtype=float))
    lineage = lineage_of(plan.attrs)
    if plan.kind == KIND_TOKENS:
        lineage = {**lineage, "sae_source": cfg.sae, "sae_sha256": {str(r.layer): r.sae_sha256 for r in rows}}
    table.attrs = {"kind": "reconstruction", "params": cfg.model_dump(), "lineage": lineage, "lake_kind": plan.kind,
                   "positions": {POSITION_LABELS[p][0]: POSITION_LABELS[p][1] for p in plan.positions},
                   "comparable_to_saebench": plan.kind == KIND_TOKENS,
                   "definitions": "see qsae.sae.metrics module docstring"}
    if plan.state is not None and plan.state.line():
        table.attrs["captured"] = plan.state.line()
    with interrupt.working():  # a stop request waits for the result to be whole
        write_result_group(cfg.ref, RESULT_GROUP, table, table.attrs, plan.state)
    fig_url = save_figure(reconstruction_figure(table), cfg.ref, f"{RESULT_GROUP}/figure.png")
    return ReconstructionResult(table, fig_url, cfg.store)


TABLE_COLUMNS = ("n_tokens", "fve", "fve_legacy", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias",
                 "l0", "l1", "dead_features", "dense_features")
MODEL_COLUMNS = ("loss_recovered", "kl_div_score", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero",
                 "model_tokens_scored")


def table_rows(table: xr.Dataset) -> list[dict[str, Any]]:
    """One row per (layer, position), the model-in-the-loop columns on each of the layer's rows."""
    rows = []
    for layer in table.layer.values:
        for p in table.position.values:
            row: dict[str, Any] = {"layer": int(layer), "position": str(p)}
            row.update({c: round(float(table[c].sel(layer=layer, position=p)), 5) for c in TABLE_COLUMNS})
            row.update({c: round(float(table[c].sel(layer=layer)), 5) for c in MODEL_COLUMNS if c in table})
            rows.append(row)
    return rows


def run_reconstruction(cfg: ReconstructionConfig, progress: bool = False) -> ReconstructionResult:
    """Plan, every layer, finish: the whole study in-process (what a notebook and the CLI call)."""
    plan = plan_reconstruction(cfg)
    with Progress(len(plan.layers), "reconstruction (offline)", "layers", bar=progress, logger=log) as bar:
        offline = []
        for layer in plan.layers:
            offline.append(offline_layer(plan, layer))
            bar.update()
    model = None
    if cfg.model_in_loop:
        log.info("loading %s for the model-in-the-loop metrics", cfg.model or plan.attrs.get("model_path"))
        lm = _load_lm(plan)
        model = [model_layer(plan, layer, lm, progress) for layer in plan.layers]
    return finish_reconstruction(plan, offline, model)


def reconstruction_figure(table: xr.Dataset):
    """Fidelity by layer (one line per metric and position) and the feature-density histograms."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    layers = table.layer.values
    positions = [str(p) for p in table.position.values]
    for name in ("fve", "fve_legacy", "cossim"):
        for p, style in zip(positions, ("o-", "s--", "x:")):
            ax1.plot(layers, table[name].sel(position=p).values, style, label=f"{name} ({p})")
    for name in ("loss_recovered", "kl_div_score"):
        if name in table and np.isfinite(table[name].values).any():
            ax1.plot(layers, table[name].values, "d-.", label=f"{name} (text, model in the loop)")
    ax1.set_xlabel("layer")
    ax1.set_xticks(layers)
    ax1.set_xlim(layers.min() - 1, layers.max() + 1)
    low = float(np.nanmin([table[n].values.min() for n in ("fve", "cossim")]))
    ax1.set_ylim(min(0.0, low) - 0.02, 1.02)
    ax1.legend(fontsize=7, loc="lower left")
    l0 = "; ".join(f"{p}: " + ", ".join(f"{int(la)}: {v:.0f}" for la, v in zip(layers, table.l0.sel(position=p).values))
                   for p in positions)
    ax1.set_title(f"L0 by layer ({l0})", fontsize=8)
    for layer in layers:
        for p in positions:
            d = table.feature_density.sel(layer=layer, position=p).values
            live = d[d > 0]
            if live.size:
                ax2.hist(np.log10(live), bins=40, histtype="step",
                         label=f"layer {layer} {p} ({int((d == 0).sum())} dead)")
    ax2.axvline(np.log10(0.1), color="crimson", ls="--", lw=1, label="dense (10%)")
    ax2.set_xlabel("log10 feature density (fraction of rows)")
    ax2.set_ylabel("features")
    ax2.legend(fontsize=7)
    fig.suptitle("SAE reconstruction metrics", fontsize=10)
    return fig


def loss_recovered(model: torch.nn.Module, sae: SAE, layer: int, windows: torch.Tensor, keep: torch.Tensor,
                   batch: int = 8, on_batch: Callable[[int], None] | None = None) -> LossRecovered:
    """CE clean / SAE-spliced / zero-ablated and KLs over ``windows`` (n, T) of token ids, the
    SAE's output (or zeros) spliced in at ``layer`` (``qsae.lm.hooks.splice``).

    ``keep`` (n, T) marks positions that are spliced and scored (False for BOS/pad); the
    loss at position t is for predicting token t+1, counted when positions t and t+1 are kept.
    ``on_batch(n)`` is called after each batch of ``n`` windows (progress).
    """
    acc = LossAccumulator()
    dev = next(model.parameters()).device
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch].to(dev)
        mask = keep[i:i + batch].to(dev)
        scored = (mask[:, :-1] & mask[:, 1:]).float()
        with torch.inference_mode():
            clean = model(input_ids=ids, use_cache=False).logits[:, :-1]

            def with_sae(x: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                return torch.where(mask[..., None], sae(x.float()).to(x.dtype), x)

            def with_zero(x: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                return torch.where(mask[..., None], torch.zeros_like(x), x)

            with splice(model, layer, with_sae, hook=sae.info.hook):
                spliced = model(input_ids=ids, use_cache=False).logits[:, :-1]
            with splice(model, layer, with_zero, hook=sae.info.hook):
                zeroed = model(input_ids=ids, use_cache=False).logits[:, :-1]
        acc.add(clean, spliced, zeroed, ids[:, 1:], scored)
        if on_batch is not None:
            on_batch(int(ids.shape[0]))
    return acc.result()
