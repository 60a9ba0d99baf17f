"""A text corpus cut into fixed context windows of token ids (what collection and the
model-in-the-loop metrics feed the model): a building block with no config and no lake."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qsae.lm.datasets import TextCorpus


@dataclass
class Windows:
    """The corpus cut into model inputs: (n_windows, context_length) ids plus per-token info."""

    inputs: np.ndarray  # int64 (n_windows, context_length), BOS included when prepended
    stored_from: int  # first stored position within each window (1 with BOS, else 0)
    doc: np.ndarray  # int32 (n_windows, tokens_per_window): document index of each stored token
    special: np.ndarray  # bool (n_windows, tokens_per_window)

    @property
    def tokens_per_window(self) -> int:
        return self.inputs.shape[1] - self.stored_from


def make_windows(corpus: TextCorpus, tokenizer, context_length: int, bos: str = "prepend",
                 max_tokens: int | None = None) -> Windows:
    """Pack the documents into fixed windows of ``context_length`` (BOS first when ``bos`` is
    ``prepend``), at most about ``max_tokens`` stored tokens; deterministic for a corpus and tokenizer."""
    eos = tokenizer.eos_token_id
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    ids, docs = [], []
    for i, text in enumerate(corpus.texts):
        toks = tokenizer(text, add_special_tokens=False).input_ids
        ids.extend(toks + [eos])
        docs.extend([i] * (len(toks) + 1))
    stored_from = 1 if bos == "prepend" else 0
    per = context_length - stored_from
    n = len(ids) // per
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // per))
    if n == 0:
        raise ValueError(f"{corpus.name}: fewer than {per} tokens, not one window")
    body = np.asarray(ids[: n * per], dtype=np.int64).reshape(n, per)
    doc = np.asarray(docs[: n * per], dtype=np.int32).reshape(n, per)
    special = body == eos
    if bos == "prepend":
        inputs = np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), body], axis=1)
    else:
        inputs = body
        special[:, 0] = True  # position 0 is an attention sink even without BOS
    return Windows(inputs, stored_from, doc, special)
