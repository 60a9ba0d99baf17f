"""The embedded default: SmolLM2-135M, its own TopK SAE at layer 15, real PopQA questions.

SmolLM2 has no published SAE, so the demo trains one (once; cached under ``storage/cache``)
from layer-15 residuals of the shipped Wikipedia paragraphs, then captures the shipped
PopQA questions through it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .capture import CaptureConfig
from .collect import CollectConfig
from .models import default_cache_dir
from .train import TrainConfig

log = logging.getLogger("qsae.demo")
DEMO_LAYER = 15
DEMO_K = 32
DEMO_TOKENS = 250_000


def demo_collect_config(cache: Path | None = None, max_tokens: int = DEMO_TOKENS) -> CollectConfig:
    cache = cache or default_cache_dir()
    return CollectConfig(model="smollm2", dataset="wiki-demo", layers=[DEMO_LAYER], context_length=128,
                         windows_per_batch=16, max_tokens=max_tokens, resid_dtype="float16", device="cpu",
                         dtype="float32", store=str(cache / "lakes" / f"smollm2-wiki-l{DEMO_LAYER}.zarr"))


def demo_train_config(cache: Path | None = None, k: int = DEMO_K) -> TrainConfig:
    cache = cache or default_cache_dir()
    return TrainConfig(store=str(cache / "lakes" / f"smollm2-wiki-l{DEMO_LAYER}.zarr"), layer=DEMO_LAYER,
                       architecture="topk", k=k, expansion=4, batch_size=4096, epochs=3, lr=4e-4,
                       dead_tokens=200_000, out=str(demo_sae_dir(cache, k)), device="cpu")


def demo_sae_dir(cache: Path | None = None, k: int = DEMO_K) -> Path:
    return (cache or default_cache_dir()) / "saes" / f"smollm2-l{DEMO_LAYER}-topk{k}"


def ensure_demo_sae(cache: Path | None = None, log_fn: Callable[[str], None] = log.info, progress: bool = True) -> Path:
    """The demo SAE folder, collecting activations and training it first if not cached."""
    from .collect import collect
    from .train import train_sae

    out = demo_sae_dir(cache)
    if (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists():
        return out
    log_fn(f"no demo SAE at {out}: collecting {DEMO_TOKENS} tokens of layer-{DEMO_LAYER} residuals and training one "
           "(once; a few minutes on 2 cores)")
    collect(demo_collect_config(cache), log_fn, progress=progress)
    res = train_sae(demo_train_config(cache), progress=progress)
    log_fn(f"demo SAE: FVE {res.final.get('fve', float('nan')):.3f}, L0 {res.final.get('l0', float('nan')):.1f}, "
           f"dead {res.final['dead']} of {res.final['d_sae']}, {res.seconds:.0f} s training -> {res.out}")
    return out


def demo_capture_config(store: str, sae: Path, questions: int = 64) -> CaptureConfig:
    return CaptureConfig(model="smollm2", sae=str(sae), layers=[DEMO_LAYER], dataset="popqa-demo", limit=questions,
                         n_samples=20, temperature=1.0, top_p=0.9, max_new_tokens=12, questions_per_shard=16,
                         questions_per_chunk=4, questions_per_batch=8, device="cpu", dtype="float32", store=store)
