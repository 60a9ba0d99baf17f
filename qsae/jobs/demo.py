"""The embedded default: SmolLM2-135M, its own TopK SAE at layer 15, real PopQA questions.

SmolLM2 has no published SAE, so the demo trains one (once; cached under ``storage/cache``)
from layer-15 residuals of the shipped Wikipedia paragraphs, then captures the shipped
PopQA questions through it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from qsae.jobs.capture import CaptureConfig
from qsae.jobs.collect import CollectConfig
from qsae.jobs.train import TrainConfig
from qsae.lm.locate import default_cache_dir
from qsae.sae.model import file_sha256

log = logging.getLogger("qsae.jobs.demo")
DEMO_LAYER = 15
DEMO_K = 32
DEMO_TOKENS = 96_000
SMALL_BUDGET = {"tokens": 12_288, "epochs": 1.0}  # the suite's check of the recipe (~30 s)
DEMO_THREADS = 2  # torch threads of the recipe: float sums, hence the bits, depend on them


def demo_collect_config(cache: Path | None = None, max_tokens: int = DEMO_TOKENS) -> CollectConfig:
    cache = cache or default_cache_dir()
    return CollectConfig(model="smollm2", dataset="wiki-demo", layers=[DEMO_LAYER], context_length=128,
                         windows_per_batch=16, max_tokens=max_tokens, resid_dtype="float16", device="cpu",
                         dtype="float32", store=str(cache / "lakes" / f"smollm2-wiki-l{DEMO_LAYER}.zarr"))


def demo_train_config(cache: Path | None = None, k: int = DEMO_K) -> TrainConfig:
    cache = cache or default_cache_dir()
    return TrainConfig(store=str(cache / "lakes" / f"smollm2-wiki-l{DEMO_LAYER}.zarr"), layer=DEMO_LAYER,
                       architecture="topk", k=k, expansion=4, batch_size=1024, epochs=4, lr=1e-3,
                       dead_tokens=200_000, out=str(demo_sae_dir(cache, k)), device="cpu")


def demo_sae_dir(cache: Path | None = None, k: int = DEMO_K) -> Path:
    """Where a locally trained demo SAE goes (the shipped one is ``SHIPPED_SAE``)."""
    return (cache or default_cache_dir()) / "saes" / f"smollm2-l{DEMO_LAYER}-topk{k}"


SHIPPED_SAE = Path(__file__).resolve().parents[1] / "data" / "demo_sae"
REPRODUCE = "qsae demo-sae --out DIR"  # trains exactly the shipped file (see tests/sae/test_demo_sae.py)


def _has_sae(folder: Path) -> bool:
    return (folder / "cfg.json").exists() and (folder / "sae_weights.safetensors").exists()


def ensure_demo_model(cache: Path | None = None) -> bool:
    """Convert the embedded SmolLM2 GGUF once; True if it was converted now (not cached)."""
    from qsae.lm.models import embedded_model_dir

    done = (Path(cache or default_cache_dir()) / "models" / "smollm2" / "qsae_revision.txt").exists()
    if not done:
        log.info("converting SmolLM2-135M-Instruct from its GGUF file to safetensors (once) ...")
    embedded_model_dir("smollm2", cache)
    return not done


def train_demo_sae(out: Path, cache: Path | None = None,
                   progress: bool = True, tokens: int = DEMO_TOKENS, epochs: float | None = None) -> Path:
    """The recipe of the shipped demo SAE: collect layer-15 residuals of the shipped Wikipedia
    paragraphs, train a TopK SAE on them, export a SAELens folder to ``out``.

    Deterministic on CPU with ``DEMO_THREADS`` threads: the same torch build gives the same
    file (the token lake goes to a temporary folder so no earlier collection is reused).
    ``tokens``/``epochs`` shrink the budget (``SMALL_BUDGET``: the test suite's check of the
    recipe, whose hash ``recipe.json`` records beside the full file's).
    """
    import tempfile

    import torch

    from qsae.jobs.collect import collect
    from qsae.jobs.train import train_sae

    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)
    try:
        with tempfile.TemporaryDirectory(prefix="qsae-demo-sae-") as tmp:
            ccfg = demo_collect_config(cache, max_tokens=tokens).model_copy(update={"store": str(Path(tmp) / "tokens.zarr")})
            collect(ccfg, progress=progress)
            tcfg = demo_train_config(cache).model_copy(update={"store": ccfg.store, "out": str(out), "resume": False})
            if epochs is not None:
                tcfg = tcfg.model_copy(update={"epochs": epochs})
            res = train_sae(tcfg, progress=progress)
    finally:
        torch.set_num_threads(threads)
    log.info(f"demo SAE: FVE {res.final.get('fve', float('nan')):.3f}, L0 {res.final.get('l0', float('nan')):.1f}, "
           f"dead {res.final['dead']} of {res.final['d_sae']}, {res.seconds:.0f} s training -> {res.out}")
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)  # resume state, not part of the SAE
    record = recipe_record(Path(out), res.final, tokens=tokens, epochs=epochs)
    (Path(out) / "recipe.json").write_text(json.dumps(record, indent=1) + "\n")
    return Path(out)


def recipe_record(folder: Path, final: dict, tokens: int = DEMO_TOKENS, epochs: float | None = None) -> dict:
    """What made a demo SAE: the command, the build whose bits it reproduces, its weights' hash."""
    import platform

    import torch

    return {
        "command": REPRODUCE,
        "tokens": tokens,
        "epochs": epochs if epochs is not None else demo_train_config().epochs,
        "collect": json.loads(demo_collect_config().model_dump_json(exclude={"store"})),
        "train": json.loads(demo_train_config().model_dump_json(exclude={"store", "out"})),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "threads": DEMO_THREADS,
        "final": final,
        "sae_weights_sha256": file_sha256(folder / "sae_weights.safetensors"),
    }


def ensure_demo_sae(cache: Path | None = None, progress: bool = True) -> Path:
    """The demo SAE folder: the one shipped in the package, else one trained once into the cache."""
    if _has_sae(SHIPPED_SAE):
        return SHIPPED_SAE
    out = demo_sae_dir(cache)
    if _has_sae(out):
        return out
    log.info(f"no shipped demo SAE at {SHIPPED_SAE}: training one into {out} ({REPRODUCE}; a few minutes on 2 cores)")
    return train_demo_sae(out, cache, progress)


def demo_capture_config(store: str, sae: Path, questions: int = 64) -> CaptureConfig:
    return CaptureConfig(model="smollm2", sae=str(sae), layers=[DEMO_LAYER], dataset="popqa-demo", limit=questions,
                         n_samples=20, temperature=1.0, top_p=0.9, max_new_tokens=12, questions_per_shard=16,
                         questions_per_chunk=4, questions_per_batch=8, device="cpu", dtype="float32", store=store)
