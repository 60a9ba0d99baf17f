"""The question lake's schema, defined once: variables, dims, dtypes, layout and attributes.

Everything that writes or reads a lake takes names, dims and dtypes from here. The names
are the public contract of ``shared/DESIGN.md``; a rename needs a ``SCHEMA_VERSION`` bump.
This module imports numpy only, so reading a lake never needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
KIND_QUESTIONS = "questions"
KIND_TOKENS = "tokens"

# float16's largest finite value: residuals beyond it are clipped and counted, never inf.
FP16_MAX = float(np.finfo(np.float16).max)
RESID_DTYPES = ("float16", "float32")

# Dimension names.
LAYER, QUESTION, SAMPLE, D_MODEL, K, NEW_TOKEN = "layer", "question", "sample", "d_model", "k", "new_token"
TOKEN = "token"
# The largest size of each dim any lake qsae writes can have (PopQA has 14,267 questions; a
# 2-billion-token lake of 2,048-wide float16 activations is 8 TB). Sizes read from a store's
# metadata are checked against these before anything is allocated from them: a store whose
# metadata claims more is refused, never read into memory.
MAX_SIZES = {QUESTION: 20_000_000, TOKEN: 2_000_000_000, LAYER: 1_024, SAMPLE: 10_000, D_MODEL: 1 << 17, K: 1 << 16,
             NEW_TOKEN: 1 << 16}

# Attributes every store carries (lineage). Values are JSON.
COMMON_ATTRS = ("schema_version", "kind", "model", "model_revision", "hook", "dataset", "dataset_revision",
                "resid_dtype", "qsae_version", "created", "config", "config_fingerprint")
REQUIRED_ATTRS = COMMON_ATTRS + ("sae_source", "sae_sha256", "d_sae", "k", "sampling", "seed", "prompt_template")


@dataclass(frozen=True)
class Variable:
    """One array of the lake: its dims, on-disk dtype, fill value and layout class.

    dtype is a numpy dtype name, or one of the placeholders ``"resid"`` (the lake's residual
    dtype) and ``"index"`` (the smallest unsigned integer holding ``d_sae - 1``).
    ``sharded`` arrays are stored as shards of ``questions_per_shard`` questions with inner
    chunks of ``questions_per_chunk`` (cheap random reads, fast whole-shard writes); the
    others are plain chunks of ``questions_per_shard`` questions.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    fill: Any
    doc: str
    sharded: bool = False
    compress: bool = False
    needs_sae: bool = False
    optional: bool = False  # added after lakes were written without it: absent there, present in new lakes


VARIABLES: tuple[Variable, ...] = (
    Variable("resid", (LAYER, QUESTION, SAMPLE, D_MODEL), "resid", np.nan,
             "activation at the lake's `hook` (resid_post: the residual after `layer`; mlp_out: that layer's MLP "
             "output) at the last token of each sampled completion", sharded=True),
    Variable("resid_prompt", (LAYER, QUESTION, D_MODEL), "resid", np.nan,
             "activation at the lake's `hook` at the last token of the prompt"),
    Variable("resid_norm", (LAYER, QUESTION, SAMPLE), "float32", np.nan,
             "L2 norm of `resid` before the cast to the on-disk dtype (flags massive activations)"),
    Variable("resid_prompt_norm", (LAYER, QUESTION), "float32", np.nan,
             "L2 norm of `resid_prompt` before the cast to the on-disk dtype"),
    Variable("resid_overflow", (LAYER, QUESTION, SAMPLE), "uint16", 0,
             "elements of `resid` beyond float16's range, stored clipped to +-65504"),
    Variable("resid_prompt_overflow", (LAYER, QUESTION), "uint16", 0,
             "elements of `resid_prompt` beyond float16's range, stored clipped to +-65504"),
    Variable("resid_nonfinite", (LAYER, QUESTION, SAMPLE), "uint16", 0,
             "NaN/inf elements the model itself produced in `resid` (stored as they came)"),
    Variable("resid_prompt_nonfinite", (LAYER, QUESTION), "uint16", 0,
             "NaN/inf elements the model itself produced in `resid_prompt`"),
    Variable("codes_idx", (LAYER, QUESTION, SAMPLE, K), "index", 0,
             "TopK SAE feature indices of `resid`, sorted ascending per row", sharded=True,
             compress=True, needs_sae=True),
    Variable("codes_val", (LAYER, QUESTION, SAMPLE, K), "float32", 0.0,
             "TopK SAE activations matching `codes_idx` (0 where fewer than k fire)",
             sharded=True, needs_sae=True),
    Variable("prompt_codes_idx", (LAYER, QUESTION, K), "index", 0,
             "TopK SAE feature indices of `resid_prompt`, sorted ascending per row",
             compress=True, needs_sae=True),
    Variable("prompt_codes_val", (LAYER, QUESTION, K), "float32", 0.0,
             "TopK SAE activations matching `prompt_codes_idx`", needs_sae=True),
    Variable("entropy", (QUESTION,), "float64", np.nan,
             "exact first-token entropy (nats) of softmax(logits / temperature) at the prompt's end"),
    Variable("sample_entropy", (QUESTION,), "float64", np.nan,
             "entropy (nats) of the empirical distribution of the S sampled first tokens"),
    Variable("nucleus_entropy", (QUESTION,), "float64", np.nan,
             "entropy (nats) of the distribution the first tokens were sampled from: softmax(logits / "
             "temperature) restricted to the top-p nucleus and renormalised (`entropy` is over the full "
             "vocabulary)", optional=True),
    Variable("first_token", (QUESTION, SAMPLE), "int32", -1, "first sampled token id"),
    Variable("first_logprob", (QUESTION, SAMPLE), "float32", np.nan,
             "log-probability of `first_token` under softmax(logits / temperature)"),
    Variable("completion", (QUESTION, SAMPLE), "str", "", "decoded sampled completion"),
    Variable("completion_ids", (QUESTION, SAMPLE, NEW_TOKEN), "int32", -1,
             "sampled token ids, padded with -1", compress=True),
    Variable("completion_len", (QUESTION, SAMPLE), "int32", 0,
             "number of sampled tokens; `resid` is taken at position prompt_len + completion_len - 1"),
    Variable("correct", (QUESTION, SAMPLE), "bool", False,
             "completion contains a gold answer (case-insensitive)"),
    Variable("question_text", (QUESTION,), "str", "", "the dataset's question"),
    Variable("answers", (QUESTION,), "str", "", "gold answers as a JSON list"),
    Variable("prompt_len", (QUESTION,), "int32", 0, "prompt length in tokens after truncation"),
    Variable("prompt_truncated", (QUESTION,), "bool", False,
             "the prompt was longer than the context allowed and was cut from the left"),
    # The dataset's row fields (PopQA's columns): covariates the analyses can stratify by.
    Variable("relation", (QUESTION,), "str", "",
             "the question's relation type (PopQA `prop`: occupation, place of birth, ...); \"\" when the "
             "dataset has none", optional=True),
    Variable("subject", (QUESTION,), "str", "", "the question's subject (PopQA `subj`)", optional=True),
    Variable("s_pop", (QUESTION,), "int64", -1,
             "popularity of the subject (PopQA `s_pop`: monthly Wikipedia page views); -1 when unknown",
             optional=True),
    Variable("o_pop", (QUESTION,), "int64", -1,
             "popularity of the gold object (PopQA `o_pop`); -1 when unknown", optional=True),
    Variable("done", (QUESTION,), "bool", False,
             "the question's whole region is durable; set last, after its data"),
)

# Optional, written at creation: the dataset's own question ids when they are not integers
# (e.g. "popqa_5"). The integer `question` coordinate is then derived from each id
# (``qsae.lm.datasets.derive_question_id``: the first 63 bits of its sha256, collisions refused).
DATASET_ID = Variable("dataset_id", (QUESTION,), "str", "",
                      "the dataset's own id of each question (present when ids are not integers)")

VARIABLES_BY_NAME: dict[str, Variable] = {v.name: v for v in VARIABLES}
# Lake variable <- the dataset row's column it comes from (PopQA's names).
ROW_FIELDS: dict[str, str] = {"relation": "prop", "subject": "subj", "s_pop": "s_pop", "o_pop": "o_pop"}
COORDS = {LAYER: "int32", QUESTION: "int64", SAMPLE: "int32"}

# The token lake: activations of every token of a text corpus, for training SAEs.
TOKEN_VARIABLES: tuple[Variable, ...] = (
    Variable("acts", (LAYER, TOKEN, D_MODEL), "resid", np.nan,
             "activation at the store's `hook` (residual after `layer`, or its MLP output)"),
    Variable("norm", (LAYER, TOKEN), "float32", np.nan, "L2 norm of `acts` before the cast to the on-disk dtype"),
    Variable("overflow", (LAYER, TOKEN), "uint16", 0, "elements beyond float16's range, stored clipped to +-65504"),
    Variable("nonfinite", (LAYER, TOKEN), "uint16", 0, "NaN/inf elements the model produced"),
    Variable("token_id", (TOKEN,), "int32", -1, "the input token id at this position"),
    Variable("doc", (TOKEN,), "int32", -1, "index of the source document"),
    Variable("position", (TOKEN,), "int32", -1, "position in the context window (BOS is position 0)"),
    Variable("special", (TOKEN,), "bool", False,
             "BOS/EOS/pad or the first position of a window without BOS: excluded from training by default"),
    Variable("done", (TOKEN,), "bool", False, "the token's block is durable; set last, after its data"),
)
TOKEN_COORDS = {LAYER: "int32"}
TOKEN_REQUIRED_ATTRS = COMMON_ATTRS + ("context_length", "bos", "tokens_per_window")


@dataclass(frozen=True)
class LakeSchema:
    """A kind of store: its variables, the unit dim along which regions are written, coords."""

    kind: str
    unit: str
    variables: tuple[Variable, ...]
    coords: dict[str, str]
    required_attrs: tuple[str, ...]

    def variables_for(self, has_sae: bool) -> tuple[Variable, ...]:
        return tuple(v for v in self.variables if has_sae or not v.needs_sae)


QUESTION_SCHEMA = LakeSchema(KIND_QUESTIONS, QUESTION, VARIABLES, COORDS, REQUIRED_ATTRS)
TOKEN_SCHEMA = LakeSchema(KIND_TOKENS, TOKEN, TOKEN_VARIABLES, TOKEN_COORDS, TOKEN_REQUIRED_ATTRS)
SCHEMAS = {s.kind: s for s in (QUESTION_SCHEMA, TOKEN_SCHEMA)}


def index_dtype(d_sae: int) -> np.dtype:
    """Smallest unsigned integer type that holds every feature index of a d_sae-wide SAE."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if d_sae - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def resolve_dtype(var: Variable, resid_dtype: str, d_sae: int | None) -> np.dtype | str:
    """The concrete on-disk dtype of a variable for a lake's resid dtype and SAE width."""
    if var.dtype == "resid":
        return np.dtype(resid_dtype)
    if var.dtype == "index":
        if d_sae is None:
            raise ValueError(f"{var.name} needs d_sae")
        return index_dtype(d_sae)
    if var.dtype == "str":
        return "str"
    return np.dtype(var.dtype)


def lake_variables(has_sae: bool) -> tuple[Variable, ...]:
    """The variables a question lake holds: the SAE codes only when an SAE was given."""
    return QUESTION_SCHEMA.variables_for(has_sae)
