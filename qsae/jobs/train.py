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

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from qsae.errors import LayerError
from qsae.jobs.configs import DEFAULT_LR, TrainConfig
from qsae.jobs.progress import Progress
from qsae.jobs.report import Report, fmt
from qsae.lake.store import TokenLake
from qsae.sae.model import SAE
from qsae.sae.trainable import ForwardOutput, InputScaler, TrainableSAE, auxk_loss

log = logging.getLogger("qsae.jobs.train")




# ------------------------------------------------------------------------- data
class BlockSource(Protocol):
    """Where activation blocks come from (the lake, or a memmap in the benchmark)."""

    n_blocks: int
    d_model: int

    def valid_rows(self, block: int) -> np.ndarray: ...

    def read(self, block: int) -> np.ndarray: ...


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


class ShuffledStream:
    """Batches from a shuffled, infinite sequence of epochs; position = step * batch_size."""

    def __init__(self, source: BlockSource, batch_size: int, buffer_blocks: int, seed: int):
        self.source, self.batch_size, self.buffer_blocks, self.seed = source, batch_size, buffer_blocks, seed
        self.valid = [source.valid_rows(b) for b in range(source.n_blocks)]
        self.rows_per_epoch = sum(len(v) for v in self.valid)
        if self.rows_per_epoch < batch_size:
            raise ValueError(f"only {self.rows_per_epoch} training tokens, fewer than one batch of {batch_size}")

    def _groups(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.source.n_blocks)
        return [order[i:i + self.buffer_blocks] for i in range(0, len(order), self.buffer_blocks)]

    def _load(self, epoch: int, g: int, blocks: np.ndarray) -> np.ndarray:
        rows = np.concatenate([self.source.read(int(b))[self.valid[b]] for b in blocks])
        perm = np.random.default_rng([self.seed, epoch, g, 1]).permutation(len(rows))
        return rows[perm]

    def _buffers(self, position: int) -> Iterator[np.ndarray]:
        """Shuffled buffers from a stream position on (the first one cut to start there)."""
        epoch, offset = divmod(position, self.rows_per_epoch)
        while True:
            groups = self._groups(epoch)
            sizes = np.array([sum(len(self.valid[b]) for b in blocks) for blocks in groups])
            starts = np.concatenate([[0], np.cumsum(sizes)])
            g0 = int(np.searchsorted(starts, offset, side="right") - 1)
            for g in range(g0, len(groups)):
                buf = self._load(epoch, g, groups[g])
                yield buf[offset - starts[g]:] if g == g0 else buf
            epoch, offset = epoch + 1, 0

    def batches(self, start_step: int = 0) -> Iterator[np.ndarray]:
        """Batches from ``start_step`` on; the next buffer is read in a background thread."""
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def produce() -> None:
            try:
                for buf in self._buffers(start_step * self.batch_size):
                    while not stop.is_set():
                        try:
                            q.put(buf, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, name="qsae-train-reader", daemon=True)
        thread.start()
        pending: list[np.ndarray] = []
        have = 0
        try:
            while True:
                while have < self.batch_size:
                    item = q.get()
                    if isinstance(item, BaseException):
                        raise item
                    pending.append(item)
                    have += len(item)
                joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
                yield joined[: self.batch_size]
                rest = joined[self.batch_size:]
                pending, have = ([rest] if len(rest) else []), len(rest)
        finally:
            stop.set()


# ------------------------------------------------------------------------ model
class DeadFeatureTracker:
    """Tokens since each latent last fired; dead = more than ``dead_tokens``."""

    def __init__(self, d_sae: int, dead_tokens: int):
        self.since = torch.zeros(d_sae, dtype=torch.long)
        self.dead_tokens = dead_tokens

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.since += n_tokens
        self.since[fired.cpu()] = 0

    def dead_mask(self) -> torch.Tensor:
        return self.since > self.dead_tokens

    @property
    def n_dead(self) -> int:
        return int(self.dead_mask().sum())


@dataclass
class Metrics:
    """Sums over a logging window (raw activation units)."""

    n: int = 0
    sse: float = 0.0
    sum_sq: float = 0.0
    sum_x: torch.Tensor | None = None
    l0: float = 0.0
    l1: float = 0.0
    loss: float = 0.0
    steps: int = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, loss: float) -> None:
        x64, e64 = x.double(), (x - x_hat).double()
        self.n += x.shape[0]
        self.sse += float(e64.pow(2).sum())
        self.sum_sq += float(x64.pow(2).sum())
        s = x64.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.l0 += float((z > 0).sum())
        self.l1 += float(z.double().abs().sum())
        self.loss += loss
        self.steps += 1

    def summary(self, d_model: int, l1_coefficient: float | None = None) -> dict[str, float]:
        """Window means; with ``l1_coefficient`` also ``loss_raw``: raw-unit MSE + λ * L1 (the 9B
        release's loss formula; codes are the same in raw and scaled units, see export)."""
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        out = {
            "loss": self.loss / self.steps,
            "mse": self.sse / (self.n * d_model),
            "fve": 1.0 - self.sse / total_var,
            "l0": self.l0 / self.n,
            "l1": self.l1 / self.n,
        }
        if l1_coefficient is not None:
            out["loss_raw"] = out["mse"] + l1_coefficient * out["l1"]
        return out


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


class Trainer:
    """One run's state: the SAE, its input scaler, the optimiser, the dead-latent tracker and the
    step. A checkpoint holds all of it, so a resumed run continues bit for bit."""

    def __init__(self, cfg: TrainConfig, d_model: int, d_sae: int):
        self.cfg = cfg
        self.sae = TrainableSAE(d_model, d_sae, cfg.architecture, cfg.k, torch.Generator().manual_seed(cfg.seed))
        self.tracker = DeadFeatureTracker(d_sae, cfg.dead_tokens)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr or DEFAULT_LR[cfg.architecture], betas=(0.9, 0.999))
        self.scaler = InputScaler(1.0)
        self.step = 0
        self.l1 = cfg.l1_coefficient

    def start(self, first: np.ndarray, init: SAE | None = None) -> None:
        """A fresh run: the scale from the first buffer, then the initial SAE (or b_dec at the mean)."""
        self.scaler = InputScaler.fit(first)
        with torch.no_grad():
            if init is not None:
                self.sae.load_from(init, self.scaler)
            else:
                self.sae.b_dec.copy_(torch.from_numpy(first.mean(0) / self.scaler.scale).float())
        self._set_l1()

    def _set_l1(self) -> None:
        # The L1 weight on the scaled inputs: λ itself, or λ / scale^2 for the raw-unit trade-off
        # (raw loss = scale^2 * MSE_scaled + λ * L1, and the codes are the same in both units).
        c = self.cfg
        self.l1 = c.l1_coefficient / self.scaler.scale**2 if c.l1_units == "raw" else c.l1_coefficient

    def to(self, dev: torch.device) -> Trainer:
        self.sae.to(dev)
        for state in self.opt.state.values():
            for key, val in state.items():
                if isinstance(val, torch.Tensor) and val.dim() > 0:
                    state[key] = val.to(dev)
        return self

    def train_step(self, xb: torch.Tensor) -> tuple[float, ForwardOutput]:
        """One optimiser step on a batch of raw activations; the loss and the forward output."""
        cfg, sae = self.cfg, self.sae
        x = self.scaler(xb)
        out = sae(x)
        err = x - out.x_hat
        loss = err.pow(2).mean()
        if cfg.architecture == "relu":
            loss = loss + self.l1 * out.codes.abs().sum(-1).mean()
        else:
            dead = self.tracker.dead_mask().to(xb.device)
            n_dead = int(dead.sum())
            if n_dead and cfg.aux_coefficient:
                aux = auxk_loss(err.detach(), out.pre, dead, sae.W_dec, cfg.aux_k)
                loss = loss + cfg.aux_coefficient * min(n_dead / cfg.aux_k, 1.0) * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.keep_decoder_unit_norm()
        self.opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        self.step += 1
        self.tracker.update((out.codes > 0).any(0), xb.shape[0])
        return float(loss), out

    def save(self, path: Path) -> None:
        """The checkpoint, written atomically (tmp file, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "since": self.tracker.since, "scale": self.scaler.scale, "config": self.cfg.model_dump_json()}, tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        """Resume from a checkpoint written by the same training config."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = TrainConfig.model_validate_json(ckpt["config"])
        skip = {"resume", "device", "log_every", "checkpoint_every"}
        if saved.model_dump(exclude=skip) != self.cfg.model_dump(exclude=skip):
            raise ValueError(f"{path} was written by another training config; use another out= or resume=False")
        self.sae.load_state_dict(ckpt["sae"])
        self.opt.load_state_dict(ckpt["opt"])
        self.tracker.since = ckpt["since"]
        self.scaler, self.step = InputScaler(float(ckpt["scale"])), int(ckpt["step"])
        self._set_l1()

    def training_record(self, final: dict[str, Any]) -> dict[str, Any]:
        """What the export records of the run (under ``qsae_training``)."""
        cfg = self.cfg
        rec = {"config": json.loads(cfg.model_dump_json()), "final": final}
        if cfg.architecture == "relu":
            rec["l1_coefficient_on_scaled_inputs"] = self.l1
        return rec


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
    stream = ShuffledStream(source, cfg.batch_size, cfg.buffer_blocks, cfg.seed)
    total_tokens = cfg.total_tokens or int(cfg.epochs * stream.rows_per_epoch)
    total_steps = max(1, total_tokens // cfg.batch_size)
    dev = torch.device(cfg.device)

    trainer = Trainer(cfg, d_model, d_sae)
    ckpt_path = _checkpoint_path(cfg)
    if cfg.resume and ckpt_path.exists():
        trainer.load(ckpt_path)
    else:
        trainer.start(next(stream._buffers(0)), init)
    trainer.to(dev)
    relu_l1 = cfg.l1_coefficient if cfg.architecture == "relu" else None

    bar = Progress(total_steps, f"train {cfg.architecture}", "steps", bar=progress, logger=log, initial=trainer.step)
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
                trainer.save(ckpt_path)
            bar.update(1)
    finally:
        batches.close()
        bar.close()
    seconds = time.perf_counter() - t0
    final = {**(history[-1] if history else {}), "dead": trainer.tracker.n_dead, "d_sae": d_sae}
    out_dir = trainer.sae.save_saelens(Path(cfg.out), trainer.scaler, lineage, trainer.training_record(final))
    return TrainResult(out_dir, trainer.step, trainer.step * cfg.batch_size, seconds, final, history, cfg.architecture)
