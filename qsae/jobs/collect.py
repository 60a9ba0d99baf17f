"""Collect token-level activations of a text corpus into a token lake (for SAE training).

Documents are tokenized, joined with EOS between them, and cut into windows of
``context_length`` tokens. With ``bos="prepend"`` each window starts with BOS, which is fed
to the model but never stored (its huge norm is an attention sink, not content); with
``bos="none"`` the first position of each window is stored but flagged ``special``, as are
the EOS separators. A block of ``windows_per_batch`` windows is the unit of work: it is
written whole and marked done, so a rerun continues where a crash stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qsae.jobs.configs import CollectConfig
from qsae.jobs.progress import Progress
from qsae.jobs.report import Report, fmt
from qsae.lake.store import TokenLake, TokenLakeSpec
from qsae.lake.writer import background_writer
from qsae.lm.convert import to_lake_dtype
from qsae.lm.datasets import load_texts
from qsae.lm.hooks import check_layers, run_with_capture
from qsae.lm.models import LoadedModel, load_model
from qsae.lm.windows import Windows, make_windows  # noqa: F401 (Windows re-exported)

log = logging.getLogger("qsae.jobs.collect")




@dataclass
class CollectResult(Report):
    """A finished token lake: where, how many tokens, which layers."""

    store: str
    tokens: int
    layers: list[int]

    @classmethod
    def of(cls, lake: TokenLake) -> CollectResult:
        return cls(lake.url, lake.n_units, lake.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "tokens": self.tokens, "layers": self.layers}

    def to_text(self) -> str:
        return (f"{fmt(self.tokens)} tokens of layers {self.layers} in {self.store}\n"
                f"train an SAE on them: qsae train --store {self.store}")


def collect(cfg: CollectConfig, progress: bool = False,
            lm: LoadedModel | None = None) -> CollectResult:
    """Run (or resume) a collection; returns what the completed token lake holds."""
    lm = lm or load_model(cfg.model, revision=cfg.model_revision, device=cfg.device, dtype=cfg.dtype,
                          trust_remote_code=cfg.trust_remote_code)
    check_layers(lm.model, cfg.layers)
    corpus = load_texts(cfg.dataset, text_field=cfg.text_field, split=cfg.dataset_split)
    for p in corpus.problems:
        log.info("corpus %s: skipped %s", corpus.name, p)
    win = make_windows(corpus, lm.tokenizer, cfg.context_length, bos=cfg.bos, max_tokens=cfg.max_tokens)
    per = win.tokens_per_window
    n_windows = win.inputs.shape[0]
    spec = TokenLakeSpec(
        n_tokens=n_windows * per, layers=cfg.layers, d_model=lm.d_model, block_tokens=cfg.windows_per_batch * per,
        resid_dtype=cfg.resid_dtype,
        lineage={"model": lm.name, "model_path": cfg.model, "model_revision": lm.revision, "hook": cfg.hook,
                 "dataset": corpus.name,
                 "dataset_revision": corpus.revision, "context_length": cfg.context_length, "bos": cfg.bos,
                 "tokens_per_window": per},
    )
    lake = TokenLake.open_or_create(cfg.ref, spec, mode=cfg.mode)
    pending = lake.pending_shards()
    log.info(f"token store {cfg.store}: {n_windows} windows x {per} tokens, {len(pending)} of {lake.n_shards} blocks to collect")
    t0 = time.perf_counter()
    with Progress(len(pending) * cfg.windows_per_batch * per, "collect", "tokens", bar=progress, logger=log) as bar, \
            background_writer(lake) as writer:
        for block in pending:
            w0 = block * cfg.windows_per_batch
            w1 = min(w0 + cfg.windows_per_batch, n_windows)
            ids = torch.from_numpy(win.inputs[w0:w1]).to(lm.device)
            kwargs = {"mlp_layers": cfg.layers} if cfg.hook == "mlp_out" else {"layers": cfg.layers}
            _, cap = run_with_capture(lm.model, ids, torch.ones_like(ids), stop_early=True, **kwargs)
            got = cap.mlp if cfg.hook == "mlp_out" else cap.resid
            parts: dict[str, list[np.ndarray]] = {"acts": [], "norm": [], "overflow": [], "nonfinite": []}
            for layer in cfg.layers:
                x = got[layer][:, win.stored_from:].reshape(-1, lm.d_model)
                stored, norm, over, nonfinite = to_lake_dtype(x, cfg.resid_dtype)
                parts["acts"].append(stored.cpu().numpy())
                parts["norm"].append(norm.cpu().numpy())
                parts["overflow"].append(over.clamp(max=65535).cpu().numpy().astype(np.uint16))
                parts["nonfinite"].append(nonfinite.clamp(max=65535).cpu().numpy().astype(np.uint16))
            data = {k: np.stack(v) for k, v in parts.items()}
            data.update(
                token_id=win.inputs[w0:w1, win.stored_from:].reshape(-1).astype(np.int32),
                doc=win.doc[w0:w1].reshape(-1),
                position=np.tile(np.arange(win.stored_from, cfg.context_length, dtype=np.int32), w1 - w0),
                special=win.special[w0:w1].reshape(-1),
            )
            writer.submit(block, data)
            bar.update((w1 - w0) * per)
    elapsed = time.perf_counter() - t0
    n_new = len(pending) * cfg.windows_per_batch * per
    if pending:
        log.info(f"collected ~{n_new} tokens in {elapsed:.1f} s ({n_new / max(elapsed, 1e-9):.0f} tokens/s)")
    return CollectResult.of(TokenLake.open(cfg.ref))
