"""The base vs fine-tuned demo on CPU: SmolLM2 and a PopQA fine-tune of it, an SAE of each,
a small question lake on each, and the comparison (``qsae demo-compare``).

Independently trained SAEs do not share features after a short CPU training (two base SAEs from
different seeds match at a mean cosine of ~0.23, nothing above 0.9), so comparing them says
nothing about the fine-tune. Instead, as in model-diffing work, the base SAE is fine-tuned on
the fine-tuned model's activations, so its features keep their identity and their drift can be
measured; the control continues the base SAE on the base model's own activations for the same
number of steps (the drift that training alone causes). Everything is cached under
``storage/cache/compare-demo``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qsae.jobs.capture import CaptureConfig, run_capture
from qsae.jobs.collect import CollectConfig, collect
from qsae.jobs.compare import CompareConfig, CompareResult, run_compare
from qsae.jobs.train import TrainConfig, train_sae
from qsae.lm.datasets import load_questions
from qsae.lm.finetune import finetune, popqa_lines
from qsae.lm.models import default_cache_dir, embedded_model_dir, load_model

log = logging.getLogger("qsae.jobs.demo_compare")
LAYER = 15


def _sae(root: Path, name: str, model_dir: Path, tokens: int, epochs: float, progress,
         init_from: str | None = None) -> str:
    sae_dir = root / f"sae-{name}"
    if not (sae_dir / "cfg.json").exists():
        model_name = "finetuned" if name.startswith("finetuned") else "base"
        store = str(root / f"tokens-{model_name}.zarr")
        log.info(f"{name}: layer-{LAYER} tokens of {model_dir.name} ({tokens}), TopK SAE"
               + (f" continued from {Path(init_from).name}" if init_from else ""))
        collect(CollectConfig(model=str(model_dir), layers=[LAYER], max_tokens=tokens, device="cpu", dtype="float32",
                              store=store), progress=progress)
        res = train_sae(TrainConfig(store=store, layer=LAYER, k=32, expansion=4, epochs=epochs, lr=4e-4,
                                    dead_tokens=100_000, init_from=init_from, out=str(sae_dir)), progress=progress)
        log.info(f"{name}: FVE {res.final.get('fve', float('nan')):.3f}, dead {res.final['dead']}, {res.steps} steps")
    return str(sae_dir)


def build_and_compare(cache: Path | None = None, *, finetune_steps: int = 300, tokens: int = 120_000,
                      epochs: float = 8, continue_epochs: float = 4, questions: int = 32, samples: int = 10,
                      progress: bool = True) -> tuple[CompareResult, dict[str, Any]]:
    """(base vs fine-tuned result, control summary: base vs base continued on base activations)."""
    root = (cache or default_cache_dir()) / "compare-demo"
    base_dir = embedded_model_dir("smollm2", cache)
    ft_dir = root / "smollm2-popqa-ft"
    if not (ft_dir / "qsae_revision.txt").exists():
        log.info(f"fine-tuning SmolLM2 for {finetune_steps} steps on the shipped PopQA Q/A lines -> {ft_dir}")
        lm = load_model(str(base_dir), device="cpu", dtype="float32")
        finetune(lm, popqa_lines(load_questions("popqa-demo").questions), ft_dir, steps=finetune_steps)
    sae_base = _sae(root, "base", base_dir, tokens, epochs, progress)
    sae_control = _sae(root, "base-continued", base_dir, tokens, continue_epochs, progress, init_from=sae_base)
    sae_ft = _sae(root, "finetuned-continued", ft_dir, tokens, continue_epochs, progress, init_from=sae_base)
    lakes = {}
    for name, model_dir, sae in (("base", base_dir, sae_base), ("finetuned", ft_dir, sae_ft)):
        lake = CaptureConfig(model=str(model_dir), sae=sae, layers=[LAYER], limit=questions, n_samples=samples,
                             max_new_tokens=12, questions_per_shard=16, questions_per_batch=8, device="cpu",
                             dtype="float32", store=str(root / f"lake-{name}.zarr"), mode="overwrite")
        run_capture(lake, progress=progress)
        lakes[name] = lake.store
    baseline = run_compare(CompareConfig(base_sae=sae_base, finetuned_sae=sae_control, layer=LAYER))
    result = run_compare(CompareConfig(base_sae=sae_base, finetuned_sae=sae_ft, layer=LAYER, base_lake=lakes["base"],
                                       finetuned_lake=lakes["finetuned"]))
    return result, baseline.summary
