"""A lake's lineage, typed and torch-free: what made it, and which SAE file made each layer's codes.

The keys are listed here once: which of them identify a run (a store written with other values
is another run), which a result records of the lake it read. Every analysis that decodes a
lake's codes asks ``Lineage.codes_sae(layer)`` and checks the SAE it loads with
``CodesSAE.check`` (``qsae.sae.formats.load_sae_for`` does both): one policy, one message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qsae.errors import LineageError, SAEFormatError

# Lineage keys that identify a capture run / a collection run.
QUESTION_IDENTITY_KEYS = ("model", "model_revision", "hook", "sae_sha256", "dataset", "dataset_revision",
                          "sampling", "seed", "prompt_template")
TOKEN_IDENTITY_KEYS = ("model", "model_revision", "hook", "dataset", "dataset_revision", "context_length", "bos")
# What a result group records of the lake it was computed from.
RESULT_KEYS = ("model", "model_revision", "sae_source", "sae_sha256", "dataset", "dataset_revision",
               "sampling", "seed", "config_fingerprint", "hook", "resid_dtype")


class CodesMismatchError(LineageError, SAEFormatError):
    """An SAE file that is not the one whose codes a lake holds (another hash or width): its
    feature indices would silently mean other features."""


@dataclass(frozen=True)
class CodesSAE:
    """The SAE file that made one layer's stored codes, as the lake recorded it."""

    layer: int
    source: str | None
    sha256: str | None
    d_sae: int | None
    k: int | None

    def check(self, sha256: str, d_sae: int, where: str = "") -> None:
        """Refuse an SAE (its file's sha256 and width) that did not make these codes."""
        at = f" ({where})" if where else ""
        if self.sha256 and sha256 != self.sha256:
            raise CodesMismatchError(
                f"the SAE{at} has sha256 {sha256[:12]}..., but the lake's codes at layer {self.layer} were made "
                f"by {self.sha256[:12]}... ({self.source}): not the same file")
        if self.d_sae is not None and d_sae != self.d_sae:
            raise CodesMismatchError(f"the SAE{at} has d_sae={d_sae}, the lake's codes have d_sae={self.d_sae}")


@dataclass(frozen=True)
class Lineage:
    """A lake's recorded lineage (its attributes), with named accessors."""

    attrs: Mapping[str, Any]

    @classmethod
    def of(cls, source: Any) -> Lineage:
        """From attributes, an xarray Dataset or a Lake (anything with ``.attrs``)."""
        attrs = getattr(source, "attrs", None)  # a Dataset is a Mapping too (of its variables): attrs first
        return cls(dict(attrs if attrs is not None else source))

    def __getattr__(self, key: str) -> Any:  # model, dataset, hook, sampling, seed, ...
        if key.startswith("_"):
            raise AttributeError(key)
        return self.attrs.get(key)

    def record(self) -> dict[str, Any]:
        """What a result group stores of this lake."""
        return {k: self.attrs[k] for k in RESULT_KEYS if k in self.attrs}

    def identity(self, keys: tuple[str, ...] = QUESTION_IDENTITY_KEYS) -> dict[str, Any]:
        return {k: self.attrs.get(k) for k in keys}

    def codes_sae(self, layer: int) -> CodesSAE:
        """Which SAE file made this layer's codes (a lake captured without an SAE has none)."""
        if self.attrs.get("d_sae") is None:
            raise SAEFormatError("this lake holds no SAE codes (captured without an SAE)")
        source = self.attrs.get("sae_source")
        if isinstance(source, Mapping):
            source = source.get(str(layer))
        return CodesSAE(int(layer), source, (self.attrs.get("sae_sha256") or {}).get(str(layer)),
                        self.attrs.get("d_sae"), self.attrs.get("k"))
