"""Bytes per sampled row, predicted from a model's config, and the batch size they allow.

A sampled row holds its own state while it decodes: per linear-attention layer a conv state
(conv_dim x kernel, model dtype) and a recurrent state (value heads x key dim x value dim,
float32 as transformers keeps it); per full-attention layer K and V for every token so far;
one logits row; and while an MoE layer runs, its experts' scratch, which for ``batched_mm`` is
a copy of each selected expert's weights per token. The reference two-pass path adds, per row,
the sampler's full-vocabulary float32 work (``generate``'s float32 copy, log-softmax, a full
sort with int64 order, cumulative sums), which the one-pass loop bounds to a fixed chunk.
``benchmarks/bench_capture_memory.py`` checks these figures against a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Float32 vocabulary rows per sampled row in the reference path's sampler at its peak: generate's
# float32 logits, log-softmax, sorted log-probs, sorted probs, int64 order (2 rows), cumsum,
# before, kept, cdf, the output scores (see sampling.pick_tokens and generate's loop).
_REFERENCE_SAMPLER_ROWS = 12


@dataclass(frozen=True)
class RowBytes:
    """Predicted bytes one sampled row occupies at its peak, by component."""

    linear_state: int
    kv_cache: int
    logits: int
    expert_scratch: int
    sampler: int
    linear_scratch: int = 0
    prefill: int = 0

    @property
    def total(self) -> int:
        return (self.linear_state + self.kv_cache + self.logits + self.expert_scratch + self.sampler
                + self.linear_scratch + self.prefill)

    def as_dict(self) -> dict[str, int]:
        return {**self.__dict__, "total": self.total}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


def row_bytes(config: Any, dtype: torch.dtype, seq_len: int, path: str = "one_pass",
              experts: str | None = "grouped_mm", linear_kernel: str = "torch") -> RowBytes:
    """Bytes per sampled row for a text config (``model.config.get_text_config()``) holding
    ``seq_len`` tokens (prompt + completion) in ``dtype`` on the given decode path.

    ``linear_kernel="torch"`` (transformers' fallback, what a CPU runs) adds the decode step's
    working copies of one layer's recurrent state (decayed state, outer-product update) and, for
    a path that prefills every row, the chunked delta rule's per-row work on a 64-token chunk;
    ``"fla"`` (flash-linear-attention's fused kernels) keeps those on chip."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    item = torch.empty((), dtype=dtype).element_size()
    n_layers = int(cfg.num_hidden_layers)
    types = list(_get(cfg, "layer_types") or ["full_attention"] * n_layers)[:n_layers]
    n_linear = sum(t == "linear_attention" for t in types)
    n_full = n_layers - n_linear
    linear = linear_scratch = prefill = 0
    if n_linear:
        key_dim = int(cfg.linear_num_key_heads) * int(cfg.linear_key_head_dim)
        value_dim = int(cfg.linear_num_value_heads) * int(cfg.linear_value_head_dim)
        conv = (2 * key_dim + value_dim) * int(cfg.linear_conv_kernel_dim) * item
        recurrent = int(cfg.linear_num_value_heads) * int(cfg.linear_key_head_dim) * int(cfg.linear_value_head_dim) * 4
        linear = n_linear * (conv + recurrent)
        if linear_kernel == "torch":
            linear_scratch = 2 * recurrent
            if path == "two_pass":  # q, k, v, k_beta, v_beta, decayed keys ... per value head, 64-token chunk
                prefill = 10 * int(cfg.linear_num_value_heads) * 64 * int(cfg.linear_value_head_dim) * 4
    heads = int(_get(cfg, "num_attention_heads"))
    head_dim = int(_get(cfg, "head_dim") or int(cfg.hidden_size) // heads)
    kv_heads = int(_get(cfg, "num_key_value_heads") or heads)
    kv = n_full * 2 * kv_heads * head_dim * seq_len * item
    vocab = int(cfg.vocab_size)
    logits = vocab * item
    scratch = 0
    top_k = int(_get(cfg, "num_experts_per_tok") or 0)
    if top_k and experts == "batched_mm":
        inter = int(_get(cfg, "moe_intermediate_size"))
        scratch = top_k * 3 * inter * int(cfg.hidden_size) * item  # gate, up and down weights copied per token
    sampler = _REFERENCE_SAMPLER_ROWS * vocab * 4 if path == "two_pass" else 0
    return RowBytes(linear, kv, logits, scratch, sampler, linear_scratch, prefill)


def fixed_bytes() -> int:
    """Memory the one-pass loop needs whatever the batch: its sampler chunk (float32 work on
    ``SAMPLER_ELEMENTS`` logits), a few vocabulary-sized rows."""
    from qsae.lm.generate import SAMPLER_ELEMENTS

    return _REFERENCE_SAMPLER_ROWS * SAMPLER_ELEMENTS * 4


def auto_questions_per_batch(config: Any, dtype: torch.dtype, device: torch.device | str, n_samples: int,
                             seq_len: int, experts: str | None, path: str = "one_pass", cpu_default: int = 8,
                             headroom: float = 0.8, most: int = 256) -> int:
    """Questions per batch that fit the free device memory (CUDA); ``cpu_default`` elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_default
    free, _ = torch.cuda.mem_get_info(device)
    kernel = "fla" if _has_fla() else "torch"
    per_question = n_samples * row_bytes(config, dtype, seq_len, path, experts, kernel).total
    usable = headroom * free - fixed_bytes()
    return int(max(1, min(most, usable // per_question)))


def _has_fla() -> bool:
    import importlib.util

    return importlib.util.find_spec("fla") is not None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """This process's peak resident memory in bytes since start or the last reset (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measured_row_bytes(run, rows: list[int], repeats: int = 2) -> tuple[float, list[int]]:
    """Peak-memory slope per sampled row on this CPU (Linux): ``run(r)`` for each batch of
    ``rows``, its peak resident memory above the memory before it (the least of ``repeats``
    runs: allocator noise only adds), then the least-squares slope over the batch sizes.
    Returns (bytes per row, the peaks)."""
    import gc

    import numpy as np

    peaks = []
    for r in rows:
        best = None
        for _ in range(repeats):
            gc.collect()
            if not reset_peak_rss():
                raise RuntimeError("peak memory cannot be reset here (Linux /proc/self/clear_refs)")
            before = peak_rss()
            run(r)
            used = peak_rss() - before
            best = used if best is None else min(best, used)
        peaks.append(best)
    slope = float(np.polyfit(np.asarray(rows, float), np.asarray(peaks, float), 1)[0])
    return slope, peaks
