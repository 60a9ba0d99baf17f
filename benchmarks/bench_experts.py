"""MoE experts implementations for decoding at the real Qwen3.5-35B-A3B widths, on this CPU.

One sparse-MoE block (hidden 2048, expert width 512, top 8; 16 experts, a row's cost does not
depend on the count beyond the 8 it selects) in float32, one decode step's tokens (one per
sampled row) at several batch sizes, for transformers' ``grouped_mm`` (the model's default,
one read of each expert's weights), ``eager`` (a loop over the experts) and ``batched_mm``
(what ``generate`` switches to on an accelerator: each selected expert's weights gathered per
token). Prints milliseconds per step and the ratio to grouped_mm, and the bytes batched_mm
gathers. The one-pass loop keeps the model's implementation (grouped_mm) on every device.

    .venv/bin/python benchmarks/bench_experts.py
"""

from __future__ import annotations

import time

import torch
from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig


def main() -> None:
    cfg = Qwen3_5MoeTextConfig(num_hidden_layers=1, layer_types=["full_attention"], num_experts=16, vocab_size=1024)
    torch.manual_seed(0)
    model = Qwen3_5MoeForCausalLM(cfg).eval()
    block = model.model.layers[0].mlp
    print(f"one MoE block: hidden {cfg.hidden_size}, expert width {cfg.moe_intermediate_size}, "
          f"{cfg.num_experts} experts, top {cfg.num_experts_per_tok}, float32, {torch.get_num_threads()} threads")
    gathered = cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4
    print(f"batched_mm gathers {gathered / 2**20:.0f} MB of expert weights per token (float32)")
    print(f"{'rows':>6s} " + " ".join(f"{impl:>12s}" for impl in ("grouped_mm", "eager", "batched_mm")) + "   ratios to grouped_mm")
    for rows in (20, 160, 640):
        x = torch.randn(rows, 1, cfg.hidden_size)
        ms = {}
        for impl in ("grouped_mm", "eager", "batched_mm"):
            model.set_experts_implementation(impl)
            with torch.inference_mode():
                block(x)
                reps = 3
                t = time.perf_counter()
                for _ in range(reps):
                    block(x)
                ms[impl] = (time.perf_counter() - t) / reps * 1000
        print(f"{rows:6d} " + " ".join(f"{ms[i]:10.1f}ms" for i in ms) + "   "
              + ", ".join(f"{i} {ms[i] / ms['grouped_mm']:.2f}" for i in ("eager", "batched_mm")))


if __name__ == "__main__":
    main()
