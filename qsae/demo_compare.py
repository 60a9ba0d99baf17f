"""The base vs fine-tuned demo on CPU: SmolLM2 and a PopQA fine-tune of it, an SAE of each,
a small question lake on each, and the comparison (``qsae demo-compare``).

Everything is cached under ``storage/cache/compare-demo`` and rebuilt only if missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .capture import CaptureConfig, run_capture
from .collect import CollectConfig, collect
from .compare_study import CompareConfig, CompareResult, run_compare
from .datasets import load_questions
from .finetune import finetune, popqa_lines
from .models import default_cache_dir, embedded_model_dir, load_model
from .train import TrainConfig, train_sae

log = logging.getLogger("qsae.demo_compare")
LAYER = 15


def build_and_compare(cache: Path | None = None, *, finetune_steps: int = 300, tokens: int = 120_000,
                      questions: int = 32, samples: int = 10, log_fn: Callable[[str], None] = log.info,
                      progress: bool = True) -> CompareResult:
    root = (cache or default_cache_dir()) / "compare-demo"
    base_dir = embedded_model_dir("smollm2", cache)
    ft_dir = root / "smollm2-popqa-ft"
    if not (ft_dir / "qsae_revision.txt").exists():
        log_fn(f"fine-tuning SmolLM2 for {finetune_steps} steps on the shipped PopQA Q/A lines -> {ft_dir}")
        lm = load_model(str(base_dir), device="cpu", dtype="float32")
        finetune(lm, popqa_lines(load_questions("popqa-demo").questions), ft_dir, steps=finetune_steps, log_fn=log_fn)
    saes, lakes = {}, {}
    for name, model_dir in (("base", base_dir), ("finetuned", ft_dir)):
        sae_dir = root / f"sae-{name}"
        if not (sae_dir / "cfg.json").exists():
            store = str(root / f"tokens-{name}.zarr")
            log_fn(f"{name}: collecting {tokens} layer-{LAYER} tokens and training a TopK SAE")
            collect(CollectConfig(model=str(model_dir), layers=[LAYER], max_tokens=tokens, device="cpu", dtype="float32",
                                  store=store), log_fn, progress=progress)
            train_sae(TrainConfig(store=store, layer=LAYER, k=32, expansion=4, epochs=3, lr=4e-4, dead_tokens=100_000,
                                  out=str(sae_dir)), progress=progress)
        saes[name] = str(sae_dir)
        lake = CaptureConfig(model=str(model_dir), sae=str(sae_dir), layers=[LAYER], limit=questions, n_samples=samples,
                             max_new_tokens=12, questions_per_shard=16, questions_per_batch=8, device="cpu",
                             dtype="float32", store=str(root / f"lake-{name}.zarr"))
        run_capture(lake, log_fn, progress=progress)
        lakes[name] = lake.store
    return run_compare(CompareConfig(base_sae=saes["base"], finetuned_sae=saes["finetuned"], layer=LAYER,
                                     base_lake=lakes["base"], finetuned_lake=lakes["finetuned"]), log_fn)
