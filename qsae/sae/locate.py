"""Where an SAE's files are and which layers they serve, found without loading them (no torch).

``qsae.sae.formats`` loads from these places; ``qsae.jobs.preflight`` asks them first, so a
mistyped SAE folder or a layer it does not have is said before a model loads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qsae.errors import SAEFormatError, SAENotCachedError

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
LAYER_FILE = re.compile(r"layer(\d+)\.sae\.pt$")
_HOOK_LAYER = re.compile(r"(?:blocks|layers)\.(\d+)\.")


def hook_of(cfg: Mapping[str, Any]) -> tuple[str, int | None, str | None]:
    """(hook point, layer, model name) of a SAELens ``cfg.json``."""
    meta = cfg.get("metadata") or {}
    hook_name = meta.get("hook_name") or cfg.get("hook_name") or ""
    model = meta.get("model_name") or cfg.get("model_name")
    layer = meta.get("hook_layer", cfg.get("hook_layer"))
    if layer is None:
        m = _HOOK_LAYER.search(hook_name)
        layer = int(m.group(1)) if m else None
    hook = "mlp_out" if ("mlp_out" in hook_name or hook_name.endswith(".mlp")) else "resid_post"
    return hook, (int(layer) if layer is not None else None), model


def resolve_hf_repo(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a cached Hugging Face repo; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = os.environ.get("HF_HUB_CACHE")  # read per call, so tests and users can redirect it
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise SAENotCachedError(
            f"{repo_id} is not in the local Hugging Face cache ({type(exc).__name__}). qsae never "
            f"downloads at run time: on a machine with access run "
            f"`huggingface-cli download {repo_id}` (or copy the files) and set HF_HOME to that cache."
        ) from None


def looks_like_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not Path(source).exists()


def sae_path(source: str | Path) -> Path:
    """The file or folder an SAE source names (a cached repo's snapshot for a repo id)."""
    source = str(source)
    path = resolve_hf_repo(source) if looks_like_repo_id(source) else Path(source).expanduser()
    if not path.exists():
        near = _near(path)
        raise SAEFormatError(f"SAE source {source} does not exist" + (f" (in {path.parent}: {near})" if near else ""))
    return path


def _near(path: Path) -> str:
    """What the folder that should hold ``path`` does hold (a few names), for a mistyped path."""
    parent = path.parent
    if not parent.is_dir():
        return ""
    names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") if names else "nothing"


def sae_layers(source: str | Path) -> dict[int | None, list[Path]]:
    """Which layers an SAE source serves, read from file names and ``cfg.json`` only: a
    Qwen-Scope folder (``layer<n>.sae.pt``), a SAELens folder or a folder of them; a single
    file maps to ``{None: [file]}`` (its layer is known only once loaded)."""
    path = sae_path(source)
    if path.is_file():
        return {None: [path]}
    if (path / SAELENS_CFG).exists():
        return {hook_of(json.loads((path / SAELENS_CFG).read_text()))[1]: [path]}
    files = {int(m.group(1)): [p] for p in path.glob("*.sae.pt") if (m := LAYER_FILE.search(p.name))}
    if files:
        return files
    by_layer: dict[int | None, list[Path]] = {}
    for cfg in path.glob(f"*/{SAELENS_CFG}"):
        by_layer.setdefault(hook_of(json.loads(cfg.read_text()))[1], []).append(cfg.parent)
    if by_layer:
        return by_layer
    pts = sorted(path.glob("*.pt"))
    if len(pts) == 1:
        return {None: pts}
    raise SAEFormatError(f"{source}: no SAE found (no cfg.json, no layer<n>.sae.pt, no single .pt file)")


def check_sae_layers(source: str | Path, layers: list[int]) -> None:
    """Refuse, before anything loads, layers an SAE source has no SAE for (names the ones it has)."""
    have = sae_layers(source)
    if None in have and len(have) == 1:
        return  # one file: its layer is checked when it loads
    known = sorted(k for k in have if k is not None)
    missing = [layer for layer in layers if layer not in have]
    if missing:
        if len(have) == 1:
            raise SAEFormatError(f"{source}: this SAE reads layer {known[0]}, not layer {missing[0]}"
                                 f"{' (pass --layers ' + str(known[0]) + ')' if known else ''}")
        raise SAEFormatError(f"{source} has no SAE for layer{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(str, missing))}; it has layers {known}")
    twice = [layer for layer in layers if len(have.get(layer, [])) > 1]
    if twice:
        raise SAEFormatError(f"{source} holds several SAELens SAEs for layer {twice[0]}: name one folder")
