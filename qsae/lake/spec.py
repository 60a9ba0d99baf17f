"""What fixes a store's shape and identity: the layout (shard and chunk sizes) and the specs of
a question lake and a token lake, with the identity two runs must share to write one store."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qsae.lake.lineage import QUESTION_IDENTITY_KEYS, TOKEN_IDENTITY_KEYS
from qsae.lake.schema import LAYER, QUESTION, QUESTION_SCHEMA, RESID_DTYPES, SAMPLE, TOKEN_SCHEMA, LakeSchema


@dataclass(frozen=True)
class LakeLayout:
    """Shard and inner-chunk sizes along the unit axis (every other axis is one chunk).

    A shard is the unit of work and of writing; inner chunks keep random reads small.
    """

    questions_per_shard: int = 64
    questions_per_chunk: int = 4

    def __post_init__(self) -> None:
        if self.questions_per_shard < 1 or self.questions_per_chunk < 1:
            raise ValueError("shard and chunk sizes must be >= 1")
        if self.questions_per_shard % self.questions_per_chunk:
            raise ValueError(
                f"questions_per_shard ({self.questions_per_shard}) must be a multiple of "
                f"questions_per_chunk ({self.questions_per_chunk})"
            )

    @property
    def shard(self) -> int:
        return self.questions_per_shard

    @property
    def chunk(self) -> int:
        return self.questions_per_chunk


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class _Spec:
    """What every store spec provides to ``Lake.open_or_create``."""

    schema: LakeSchema
    layers: Sequence[int]
    d_model: int
    resid_dtype: str
    layout: LakeLayout
    lineage: dict[str, Any]
    has_sae: bool = False
    d_sae: int | None = None

    def sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def coords(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def extra_attrs(self) -> dict[str, Any]:
        return {}

    def _check_common(self, identity_keys: Sequence[str]) -> None:
        if len(self.layers) == 0 or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be non-empty and unique, got {list(self.layers)}")
        if self.resid_dtype not in RESID_DTYPES:
            raise ValueError(f"resid_dtype must be one of {RESID_DTYPES}, got {self.resid_dtype!r}")
        if self.d_model < 1:
            raise ValueError("d_model must be >= 1")
        missing = [key for key in identity_keys if key not in self.lineage]
        if missing:
            raise ValueError(f"lineage is missing {missing}")


@dataclass
class LakeSpec(_Spec):
    """Everything that fixes a question lake's shape and identity.

    ``lineage`` holds model, model_revision, hook, sae_source, sae_sha256 ({layer: hash}),
    dataset, dataset_revision, sampling, seed and prompt_template.
    """

    question_ids: Sequence[int] = ()
    layers: Sequence[int] = ()
    n_samples: int = 1
    d_model: int = 0
    max_new_tokens: int = 1
    d_sae: int | None = None
    k: int | None = None
    resid_dtype: str = "float16"
    layout: LakeLayout = field(default_factory=LakeLayout)
    lineage: dict[str, Any] = field(default_factory=dict)
    dataset_ids: Sequence[str] | None = None  # the dataset's own ids, when they are not integers
    schema: LakeSchema = field(default=QUESTION_SCHEMA, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dataset_ids is not None and len(self.dataset_ids) != len(self.question_ids):
            raise ValueError("dataset_ids must match question_ids one to one")
        ids = np.asarray(self.question_ids, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("question_ids must be a non-empty 1-D sequence")
        if np.unique(ids).size != ids.size:
            raise ValueError("question_ids must be unique")
        if (self.d_sae is None) != (self.k is None):
            raise ValueError("d_sae and k go together: give both (SAE codes) or neither")
        if self.n_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("n_samples and max_new_tokens must be >= 1")
        self._check_common(QUESTION_IDENTITY_KEYS)

    @property
    def has_sae(self) -> bool:  # type: ignore[override]
        return self.d_sae is not None

    def sizes(self) -> dict[str, int]:
        return {"layer": len(self.layers), "question": len(self.question_ids), "sample": self.n_samples,
                "d_model": self.d_model, "k": self.k or 0, "new_token": self.max_new_tokens}

    def coords(self) -> dict[str, np.ndarray]:
        return {
            LAYER: np.asarray(self.layers, dtype="int32"),
            QUESTION: np.asarray(self.question_ids, dtype="int64"),
            SAMPLE: np.arange(self.n_samples, dtype="int32"),
        }

    def identity(self) -> dict[str, Any]:
        """The JSON dict two runs must share to write into the same store."""
        ids = np.asarray(self.question_ids, dtype=np.int64)
        ident = {
            "sizes": self.sizes(),
            "question_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
            "layers": [int(x) for x in self.layers],
            "d_sae": self.d_sae,
            "resid_dtype": self.resid_dtype,
            "shard_size": self.layout.shard,
            "chunk_size": self.layout.chunk,
        }
        if self.dataset_ids is not None:  # absent for integer ids: older lakes keep their identity
            ident["dataset_ids_sha256"] = hashlib.sha256("\n".join(self.dataset_ids).encode()).hexdigest()
        ident.update({key: _jsonable(self.lineage[key]) for key in QUESTION_IDENTITY_KEYS})
        raw = {layer: relu for layer, relu in (self.lineage.get("sae_topk_relu") or {}).items() if not relu}
        if raw:  # codes without ReLU after the top-k (Qwen-Scope): not the same run as ReLU'd codes
            ident["sae_topk_raw_layers"] = sorted(raw)
        return ident

    def extra_attrs(self) -> dict[str, Any]:
        return {"d_sae": self.d_sae, "k": self.k, "sae_source": self.lineage.get("sae_source")}


@dataclass
class TokenLakeSpec(_Spec):
    """A token lake: ``n_tokens`` activations per layer, written in blocks of ``block_tokens``.

    ``lineage`` holds model, model_revision, hook, dataset, dataset_revision, context_length,
    bos, tokens_per_window.
    """

    n_tokens: int = 0
    layers: Sequence[int] = ()
    d_model: int = 0
    block_tokens: int = 4096
    resid_dtype: str = "float16"
    lineage: dict[str, Any] = field(default_factory=dict)
    schema: LakeSchema = field(default=TOKEN_SCHEMA, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_tokens < 1 or self.block_tokens < 1:
            raise ValueError("n_tokens and block_tokens must be >= 1")
        self._check_common(TOKEN_IDENTITY_KEYS)

    @property
    def layout(self) -> LakeLayout:  # type: ignore[override]
        return LakeLayout(self.block_tokens, self.block_tokens)

    def sizes(self) -> dict[str, int]:
        return {"layer": len(self.layers), "token": self.n_tokens, "d_model": self.d_model}

    def coords(self) -> dict[str, np.ndarray]:
        return {LAYER: np.asarray(self.layers, dtype="int32")}

    def identity(self) -> dict[str, Any]:
        ident = {"sizes": self.sizes(), "layers": [int(x) for x in self.layers], "resid_dtype": self.resid_dtype,
                 "shard_size": self.block_tokens, "chunk_size": self.block_tokens}
        ident.update({key: _jsonable(self.lineage[key]) for key in TOKEN_IDENTITY_KEYS})
        return ident

    def extra_attrs(self) -> dict[str, Any]:
        extra = {"tokens_per_window": self.lineage.get("tokens_per_window")}
        if "model_path" in self.lineage:  # what to load the model from again (not identity: paths move)
            extra["model_path"] = self.lineage["model_path"]
        return extra


def fingerprint(identity: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of an identity dict."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two identity dicts, as (stored, wanted)."""
    a, b = _flatten(stored), _flatten(wanted)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
