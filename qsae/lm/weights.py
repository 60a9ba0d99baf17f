"""Reading a model's weights without loading the model: its local folder, the unembedding and
the final norm's gain from safetensors, tensor by tensor (the dashboards' logit effects)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def local_model_folder(path: str | None) -> Path | None:
    """The local folder of a lake's model (its lineage's ``model_path``; the embedded alias's
    converted copy), or None when it is not on this machine."""
    if not path:
        return None
    from qsae.lm.locate import EMBEDDED, default_cache_dir

    if path in EMBEDDED:
        folder = default_cache_dir() / "models" / path
        return folder if (folder / "config.json").exists() else None
    folder = Path(str(path)).expanduser()
    return folder if (folder / "config.json").exists() else None


def unembedding(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(W_U (vocab, d), the final norm's effective gain (d,)) read from safetensors, tensor by
    tensor. Qwen3.5-style norms scale by (1 + weight), Llama-style by weight."""
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    found: dict[str, np.ndarray] = {}
    wanted = {"unembed": ("lm_head.weight", "model.lm_head.weight"),
              "embed": ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
              "norm": ("model.norm.weight", "model.language_model.norm.weight")}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for role, names in wanted.items():
                for name in names:
                    if role not in found and name in keys:
                        found[role] = f.get_tensor(name).float().numpy()
    W_U = found.get("unembed", found.get("embed") if cfg.get("tie_word_embeddings", text.get("tie_word_embeddings")) else None)
    if W_U is None or "norm" not in found:
        raise FileNotFoundError(f"no unembedding or final norm weight in {folder}")
    kind = str(text.get("model_type", cfg.get("model_type", "")))
    gain = found["norm"] + 1.0 if kind.startswith(("qwen3_5", "qwen3_next")) else found["norm"]
    return W_U, gain
