"""Train SAEs from a token lake: TopK (Qwen-Scope style) or ReLU + L1 (the 9B release).

Data: blocks of the token lake are read in a per-epoch random order, ``buffer_blocks`` at a
time, their valid rows (not ``special``) shuffled inside that buffer, and served as batches;
the next buffer is read in a background thread while the current one trains. The order is a
pure function of (seed, epoch, buffer), so training resumed from a checkpoint sees exactly
the batches it would have seen.

Model (``qsae.sae.trainable``): ``pre = (x - b_dec) @ W_enc + b_enc``; TopK keeps the k
largest (then ReLU), ReLU keeps all positive; ``x_hat = z @ W_dec + b_dec``. Decoder rows
(one per feature) are kept at unit norm (the gradient component along them is removed before
each step). Inputs are scaled by one scalar so that E||x||^2 = d_model (``InputScaler``); the
scale is folded into the exported weights, so the saved SAE reads raw activations. The
``Trainer`` holds the step, optimiser, tracker and scaler; its checkpoint holds all of them.

TopK loss: MSE + aux_coefficient * AuxK (Gao et al. 2024, as sparsify): AuxK reconstructs the
residual error e = x - x_hat from the top ``aux_k`` pre-activations of latents dead for
``dead_tokens`` tokens, ``||e - e_hat||^2 / ||e - mean(e)||^2`` over the batch (normalised by
the variance of the residual error, so its weight does not drift as the error shrinks), scaled
by min(n_dead / aux_k, 1). The paper's defaults are aux_k = 512, dead after 10M tokens,
coefficient 1/32; qsae keeps 1/32 but defaults to aux_k = 256 and 250k tokens, because its
CPU-sized runs see ~1M tokens (a latent could never be declared dead after 10M).

ReLU loss: MSE + l1_coefficient * mean_batch(sum_features |z|). MSE is the mean over elements
of the scaled activations, and decoder rows are unit-norm, so with ``l1_units="scaled"`` λ is
not the 9B release's penalty (raw activations, free decoder). ``l1_units="raw"`` makes the
trade-off the release's in raw units (the scaled λ becomes λ / scale^2; only the decoder
constraint still differs), and every log line reports ``loss_raw`` = raw-unit MSE + λ * L1,
the release's formula on its units (its final loss: 0.0062 at λ = 0.005).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsae.errors import LayerError
from qsae.jobs.configs import TrainConfig  # noqa: F401 (re-exported)
from qsae.jobs.progress import Progress
from qsae.jobs.report import Report, fmt
from qsae.lake.store import TokenLake
from qsae.sae.params import DEFAULT_LR  # noqa: F401 (re-exported)
from qsae.sae.training import BlockSource, DeadFeatureTracker, Metrics, ShuffledStream, Trainer  # noqa: F401

log = logging.getLogger("qsae.jobs.train")


class LakeSource:
    """Blocks of one layer of a token lake; rows flagged ``special`` or not done are skipped."""

    def __init__(self, lake: TokenLake, layer: int, include_special: bool = False):
        if layer not in lake.layers:
            raise LayerError(f"layer {layer} is not in the store (layers {lake.layers})")
        self.lake = lake
        self.layer_index = lake.layers.index(layer)
        self.acts = lake.arrays["acts"]
        self.d_model = int(self.acts.shape[-1])
        self.n_blocks = lake.n_shards
        valid = lake.done_mask()
        if not include_special:
            valid &= ~np.asarray(lake.arrays["special"][:], dtype=bool)
        self._valid = valid

    def _slice(self, block: int) -> slice:
        return self.lake.shard_region(block)

    def valid_rows(self, block: int) -> np.ndarray:
        return np.flatnonzero(self._valid[self._slice(block)])

    def read(self, block: int) -> np.ndarray:
        return np.asarray(self.acts[self.layer_index, self._slice(block)], dtype=np.float32)


@dataclass
class TrainResult(Report):
    """The exported SAE's folder, how long it trained and its final metrics."""

    out: Path
    steps: int
    tokens: int
    seconds: float
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    architecture: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "architecture": self.architecture, "steps": self.steps, "tokens": self.tokens,
                "seconds": self.seconds, **self.final}

    def to_text(self) -> str:
        f = self.final
        return (f"SAE trained ({self.architecture}, d_sae {fmt(f.get('d_sae'))}): {fmt(self.steps)} steps on "
                f"{fmt(self.tokens)} tokens in {self.seconds:.0f} s; FVE {fmt(f.get('fve'))}, L0 {fmt(f.get('l0'))}, "
                f"dead latents {fmt(f.get('dead'))}\nSAELens folder: {self.out}  (qsae capture --sae {self.out} ...)")

    def to_markdown(self) -> str:
        f = self.final
        return "\n".join([
            f"# SAE trained: `{self.out}`", "",
            "| architecture | d_sae | steps | tokens | FVE | L0 | dead | seconds |", "|---|---|---|---|---|---|---|---|",
            f"| {self.architecture} | {f.get('d_sae')} | {self.steps} | {self.tokens} | {fmt(f.get('fve'))} | "
            f"{fmt(f.get('l0'))} | {f.get('dead')} | {self.seconds:.0f} |"])


def _checkpoint_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "checkpoints" / "latest.pt"


def train_sae(cfg: TrainConfig, on_log: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
              source: BlockSource | None = None, lineage: dict[str, Any] | None = None) -> TrainResult:
    """Train (or resume) an SAE and export it as a SAELens folder under ``cfg.out``; ``on_log``
    receives each logged metrics entry (a dict), e.g. for a progress display or a tracker."""
    lake = None
    if source is None:
        lake = TokenLake.open(cfg.ref)
        layer = cfg.layer if cfg.layer is not None else (lake.layers[0] if len(lake.layers) == 1 else None)
        if layer is None:
            raise LayerError(f"the store has layers {lake.layers}: choose one with layer=")
        source = LakeSource(lake, layer, cfg.include_special)
        lineage = {"model": lake.attrs["model"], "hook": lake.attrs["hook"], "layer": layer, "store": cfg.store,
                   "context_length": lake.attrs["context_length"], **(lineage or {})}
    lineage = lineage or {}
    d_model = source.d_model
    d_sae = cfg.d_sae or cfg.expansion * d_model
    init = None
    if cfg.init_from:
        from qsae.sae.formats import load_sae

        init = load_sae(cfg.init_from, k=1)  # only its weights matter; a TopK file without k loads too
        d_sae = init.d_sae
    stream = ShuffledStream(source, cfg.batch_size, cfg.buffer_blocks, cfg.trainer.seed)
    total_tokens = cfg.total_tokens or int(cfg.epochs * stream.rows_per_epoch)
    total_steps = max(1, total_tokens // cfg.batch_size)
    dev = torch.device(cfg.device)

    trainer = Trainer(cfg.trainer, d_model, d_sae)
    # What else fixes the data each step sees and the run's length: a resume must match it too.
    run = {"store": cfg.store, "layer": cfg.layer, "d_sae": d_sae, "batch_size": cfg.batch_size,
           "buffer_blocks": cfg.buffer_blocks, "include_special": cfg.include_special, "epochs": cfg.epochs,
           "total_tokens": cfg.total_tokens, "init_from": cfg.init_from}
    ckpt_path = _checkpoint_path(cfg)
    if cfg.resume and ckpt_path.exists():
        trainer.load(ckpt_path, run)
    else:
        trainer.start(next(stream._buffers(0)), init)
    trainer.to(dev)
    arch = cfg.trainer.architecture
    relu_l1 = cfg.trainer.l1_coefficient if arch == "relu" else None

    bar = Progress(total_steps, f"train {arch}", "steps", bar=progress, logger=log, initial=trainer.step)
    history: list[dict[str, float]] = []
    window = Metrics()
    t0 = time.perf_counter()
    batches = stream.batches(trainer.step)
    try:
        while trainer.step < total_steps:
            xb = torch.from_numpy(next(batches)).to(dev)
            loss, out = trainer.train_step(xb)
            step = trainer.step
            with torch.no_grad():
                window.add(xb, trainer.scaler.unscale(out.x_hat), out.codes, loss)
            if step % cfg.log_every == 0 or step == total_steps:
                entry = {"step": step, "tokens": step * cfg.batch_size, **window.summary(d_model, relu_l1),
                         "dead": trainer.tracker.n_dead}
                history.append(entry)
                window = Metrics()
                log.debug("train step %d: %s", step, entry)
                if on_log:
                    on_log(entry)
                bar.set_postfix(fve=f"{entry['fve']:.3f}", l0=f"{entry['l0']:.1f}", dead=entry["dead"])
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                trainer.save(ckpt_path, run)
            bar.update(1)
    finally:
        batches.close()
        bar.close()
    seconds = time.perf_counter() - t0
    final = {**(history[-1] if history else {}), "dead": trainer.tracker.n_dead, "d_sae": d_sae}
    out_dir = trainer.sae.save_saelens(Path(cfg.out), trainer.scaler, lineage, trainer.training_record(final, run))
    return TrainResult(out_dir, trainer.step, trainer.step * cfg.batch_size, seconds, final, history, arch)
