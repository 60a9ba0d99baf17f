"""Train SAEs from a token lake: TopK (Qwen-Scope style) or ReLU + L1 (the 9B release).

Data: blocks of the token lake are read in a per-epoch random order, ``buffer_blocks`` at a
time, their valid rows (not ``special``) shuffled inside that buffer, and served as batches;
the next buffer is read in a background thread while the current one trains. The order is a
pure function of (seed, epoch, buffer), so training resumed from a checkpoint sees exactly
the batches it would have seen.

Model: ``pre = (x - b_dec) @ W_enc + b_enc``; TopK keeps the k largest (then ReLU), ReLU
keeps all positive; ``x_hat = z @ W_dec + b_dec``. Decoder rows (one per feature) are kept at
unit norm (the gradient component along them is removed before each step). Inputs are
scaled by one scalar so that E||x||^2 = d_model; the scale is folded into the exported
weights, so the saved SAE reads raw activations.

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
from safetensors.torch import save_file

from qsae.errors import LayerError
from qsae.jobs.configs import DEFAULT_LR, TrainConfig
from qsae.lake.store import TokenLake

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


class TrainableSAE(torch.nn.Module):
    def __init__(self, d_model: int, d_sae: int, architecture: str, k: int, generator: torch.Generator):
        super().__init__()
        w = torch.randn(d_sae, d_model, generator=generator)
        w /= w.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_model))
        self.architecture, self.k = architecture, k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def codes(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "relu":
            return pre.relu()
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def forward(self, x: torch.Tensor):
        pre = self.pre(x)
        z = self.codes(pre)
        return z @ self.W_dec + self.b_dec, z, pre

    @torch.no_grad()
    def keep_decoder_unit_norm(self) -> None:
        if self.W_dec.grad is not None:
            g = self.W_dec.grad
            g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)


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


def auxk_loss(err: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, W_dec: torch.Tensor, aux_k: int) -> torch.Tensor:
    """Gao et al.'s AuxK: the error ``err`` modelled by the top ``aux_k`` dead latents' codes
    (through the decoder, no bias), its squared error over the batch divided by the error's
    own total variance ``||err - mean(err)||^2`` (as sparsify does)."""
    kk = min(aux_k, int(dead.sum()))
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(kk, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(-1, idx, vals.relu()) @ W_dec
    total_var = (err - err.mean(0)).pow(2).sum()
    return (e_hat - err).pow(2).sum() / total_var.clamp_min(torch.finfo(err.dtype).tiny)


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens: int
    seconds: float
    final: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def _init_from(sae: TrainableSAE, src, scale: float) -> None:
    """Load an SAE (raw-activation units) into the trainer's scaled parametrisation.

    The source encodes ``(x - b_pre) @ W_enc + b_enc``; the trainer subtracts ``b_dec`` instead,
    so ``(b_dec - b_pre) @ W_enc`` is folded into ``b_enc`` (a Qwen-Scope SAE has b_pre = 0 and
    b_dec != 0): the pre-activations are the source's exactly. Decoder rows are renormalised to
    unit length (a training invariant); for a ReLU SAE each latent's encoder column and bias
    are multiplied by its scaled decoder row's norm, so the function is unchanged; a TopK SAE's
    ranking would change under that, so there the codes stay the source's and x_hat changes
    by the renormalisation only.
    """
    if (src.d_model, src.d_sae) != tuple(sae.W_enc.shape):
        raise ValueError(f"{src.info.source} is {src.d_model} x {src.d_sae}, the trainer needs {tuple(sae.W_enc.shape)}")
    W_dec = src.W_dec.float()
    norms = W_dec.norm(dim=-1)  # the scaled decoder W_dec / scale has row norms norms / scale
    W_enc, b_dec = src.W_enc.float(), src.b_dec.float()
    b_enc = src.b_enc.float() + (b_dec - src.b_pre.float()) @ W_enc
    if sae.architecture == "relu":
        W_enc, b_enc = W_enc * (norms / scale), b_enc * (norms / scale)
    sae.W_dec.copy_(W_dec / norms[:, None])
    sae.W_enc.copy_(W_enc * scale)
    sae.b_enc.copy_(b_enc)
    sae.b_dec.copy_(b_dec / scale)


def _checkpoint_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "checkpoints" / "latest.pt"


def _save_checkpoint(path: Path, sae: TrainableSAE, opt, step: int, tracker: DeadFeatureTracker, scale: float, cfg: TrainConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"sae": sae.state_dict(), "opt": opt.state_dict(), "step": step, "since": tracker.since,
                "scale": scale, "config": cfg.model_dump_json()}, tmp)
    tmp.replace(path)


def train_sae(cfg: TrainConfig, log_fn: Callable[[dict[str, Any]], None] | None = None, progress: bool = False,
              source: BlockSource | None = None, lineage: dict[str, Any] | None = None) -> TrainResult:
    """Train (or resume) an SAE and export it as a SAELens folder under ``cfg.out``."""
    lake = None
    if source is None:
        lake = TokenLake.open(cfg.store, storage_options=cfg.storage_options)
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
    lr = cfg.lr or DEFAULT_LR[cfg.architecture]
    stream = ShuffledStream(source, cfg.batch_size, cfg.buffer_blocks, cfg.seed)
    total_tokens = cfg.total_tokens or int(cfg.epochs * stream.rows_per_epoch)
    total_steps = max(1, total_tokens // cfg.batch_size)
    dev = torch.device(cfg.device)

    gen = torch.Generator().manual_seed(cfg.seed)
    sae = TrainableSAE(d_model, d_sae, cfg.architecture, cfg.k, gen)
    tracker = DeadFeatureTracker(d_sae, cfg.dead_tokens)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    ckpt_path = _checkpoint_path(cfg)
    step = 0
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = TrainConfig.model_validate_json(ckpt["config"])
        if saved.model_dump(exclude={"resume", "device", "log_every", "checkpoint_every"}) != cfg.model_dump(
                exclude={"resume", "device", "log_every", "checkpoint_every"}):
            raise ValueError(f"{ckpt_path} was written by another training config; use another out= or resume=False")
        sae.load_state_dict(ckpt["sae"])
        opt.load_state_dict(ckpt["opt"])
        tracker.since = ckpt["since"]
        scale, step = float(ckpt["scale"]), int(ckpt["step"])
    else:
        first = next(stream._buffers(0))
        scale = float(np.sqrt(np.mean(np.sum(first.astype(np.float64) ** 2, axis=1)) / d_model))
        with torch.no_grad():
            if init is not None:
                _init_from(sae, init, scale)
            else:
                sae.b_dec.copy_(torch.from_numpy(first.mean(0) / scale).float())
    sae.to(dev)
    for state in opt.state.values():
        for key, val in state.items():
            if isinstance(val, torch.Tensor) and val.dim() > 0:
                state[key] = val.to(dev)

    # The L1 weight on the scaled inputs: λ itself, or λ / scale^2 for the raw-unit trade-off
    # (raw loss = scale^2 * MSE_scaled + λ * L1, and the codes are the same in both units).
    l1 = cfg.l1_coefficient / scale**2 if cfg.l1_units == "raw" else cfg.l1_coefficient
    relu_l1 = cfg.l1_coefficient if cfg.architecture == "relu" else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc=f"train {cfg.architecture}")
    history: list[dict[str, float]] = []
    window = Metrics()
    t0 = time.perf_counter()
    batches = stream.batches(step)
    try:
        while step < total_steps:
            xb = torch.from_numpy(next(batches)).to(dev)
            x = xb / scale
            x_hat, z, pre = sae(x)
            err = x - x_hat
            loss = err.pow(2).mean()
            if cfg.architecture == "relu":
                loss = loss + l1 * z.abs().sum(-1).mean()
            else:
                dead = tracker.dead_mask().to(dev)
                n_dead = int(dead.sum())
                if n_dead and cfg.aux_coefficient:
                    aux = auxk_loss(err.detach(), pre, dead, sae.W_dec, cfg.aux_k)
                    loss = loss + cfg.aux_coefficient * min(n_dead / cfg.aux_k, 1.0) * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.keep_decoder_unit_norm()
            opt.step()
            with torch.no_grad():
                sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
            step += 1
            fired = (z > 0).any(0)
            tracker.update(fired, xb.shape[0])
            with torch.no_grad():
                window.add(xb, x_hat * scale, z, float(loss))
            if step % cfg.log_every == 0 or step == total_steps:
                entry = {"step": step, "tokens": step * cfg.batch_size, **window.summary(d_model, relu_l1),
                         "dead": tracker.n_dead}
                history.append(entry)
                window = Metrics()
                if log_fn:
                    log_fn(entry)
                if bar is not None:
                    bar.set_postfix(fve=f"{entry['fve']:.3f}", l0=f"{entry['l0']:.1f}", dead=entry["dead"])
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                _save_checkpoint(ckpt_path, sae, opt, step, tracker, scale, cfg)
            if bar is not None:
                bar.update(1)
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    final = {**(history[-1] if history else {}), "dead": tracker.n_dead, "d_sae": d_sae}
    out = export_saelens(sae, scale, cfg, Path(cfg.out), lineage, final, d_sae)
    return TrainResult(out, step, step * cfg.batch_size, seconds, final, history)


def export_saelens(sae: TrainableSAE, scale: float, cfg: TrainConfig, out: Path, lineage: dict[str, Any],
                   final: dict[str, Any], d_sae: int) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens format, raw-activation units)."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        weights = {
            "W_enc": (sae.W_enc / scale).detach().cpu().contiguous(),
            "b_enc": sae.b_enc.detach().cpu().contiguous(),
            "W_dec": (sae.W_dec * scale).detach().cpu().contiguous(),
            "b_dec": (sae.b_dec * scale).detach().cpu().contiguous(),
        }
    save_file(weights, str(out / "sae_weights.safetensors"))
    layer, hook = lineage.get("layer"), lineage.get("hook", "resid_post")
    cfg_json = {
        "architecture": "topk" if cfg.architecture == "topk" else "standard",
        "d_in": int(weights["W_enc"].shape[0]),
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": lineage.get("model"),
            "hook_name": f"blocks.{layer}.hook_{hook}" if layer is not None else None,
            "hook_layer": layer,
            "context_size": lineage.get("context_length"),
            "dataset_path": lineage.get("store"),
        },
        "qsae_training": {"config": json.loads(cfg.model_dump_json()), "input_scale": scale, "final": final,
                          **({"l1_coefficient_on_scaled_inputs": cfg.l1_coefficient / scale**2
                              if cfg.l1_units == "raw" else cfg.l1_coefficient}
                             if cfg.architecture == "relu" else {})},
    }
    if cfg.architecture == "topk":
        cfg_json["k"] = cfg.k
    (out / "cfg.json").write_text(json.dumps(cfg_json, indent=2))
    return out
