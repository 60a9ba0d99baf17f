"""The SAE trainer's building blocks: a shuffled, resumable stream of activation batches, the
dead-latent tracker, windowed metrics and the ``Trainer`` (SAE, scaler, optimiser, step; its
checkpoint holds all of it). ``qsae.jobs.train`` feeds it a token lake and exports the result;
the training recipe is described there.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from qsae.sae.model import SAE
from qsae.sae.params import TrainerParams
from qsae.sae.trainable import ForwardOutput, InputScaler, TrainableSAE, auxk_loss


# ------------------------------------------------------------------------- data
class BlockSource(Protocol):
    """Where activation blocks come from (the lake, or a memmap in the benchmark)."""

    n_blocks: int
    d_model: int

    def valid_rows(self, block: int) -> np.ndarray: ...

    def read(self, block: int) -> np.ndarray: ...


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


class Trainer:
    """One run's state: the SAE, its input scaler, the optimiser, the dead-latent tracker and the
    step. A checkpoint holds all of it, so a resumed run continues bit for bit."""

    def __init__(self, cfg: TrainerParams, d_model: int, d_sae: int):
        self.cfg = cfg
        self.sae = TrainableSAE(d_model, d_sae, cfg.architecture, cfg.k, torch.Generator().manual_seed(cfg.seed))
        self.tracker = DeadFeatureTracker(d_sae, cfg.dead_tokens)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.resolved_lr, betas=(0.9, 0.999))
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

    def save(self, path: Path, run: dict[str, Any] | None = None) -> None:
        """The checkpoint, written atomically (tmp file, then rename); it records the trainer's
        parameters and ``run`` (what a resume must also match)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        config = json.dumps({"trainer": self.cfg.model_dump(mode="json"), "run": run or {}}, sort_keys=True)
        torch.save({"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "since": self.tracker.since, "scale": self.scaler.scale, "config": config}, tmp)
        tmp.replace(path)

    def load(self, path: Path, run: dict[str, Any] | None = None) -> None:
        """Resume from a checkpoint written with the same trainer parameters (and, given, the
        same ``run``: what else fixes the data a step sees, e.g. the batch size and the lake)."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = json.loads(ckpt["config"])
        if saved != {"trainer": self.cfg.model_dump(mode="json"), "run": run or {}}:
            raise ValueError(f"{path} was written by another training config; use another out= or resume=False")
        self.sae.load_state_dict(ckpt["sae"])
        self.opt.load_state_dict(ckpt["opt"])
        self.tracker.since = ckpt["since"]
        self.scaler, self.step = InputScaler(float(ckpt["scale"])), int(ckpt["step"])
        self._set_l1()

    def training_record(self, final: dict[str, Any], run: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the export records of the run (under ``qsae_training``)."""
        cfg = self.cfg
        rec = {"config": {**(run or {}), **cfg.model_dump(mode="json")}, "final": final}
        if cfg.architecture == "relu":
            rec["l1_coefficient_on_scaled_inputs"] = self.l1
        return rec
