"""MoE experts implementations for decoding at the real Qwen3.5-35B-A3B widths, on this CPU.

One sparse-MoE block (hidden 2048, expert width 512, top 8; 16 experts by default, 256 with
``--experts 256``: eager loops over the experts a step hits, so the count matters to it) in float32, one decode step's tokens (one per
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
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=16, help="256: the real count (3.2 GB of float32 weights)")
    args = ap.parse_args()
    cfg = Qwen3_5MoeTextConfig(num_hidden_layers=1, layer_types=["full_attention"], num_experts=args.experts,
                               vocab_size=1024)
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
        ms: dict[str, float | None] = {}
        for impl in ("grouped_mm", "eager", "batched_mm"):
            # batched_mm's gate_up gather alone: rows x top-k x (2 x width x hidden) float32
            need = rows * cfg.num_experts_per_tok * 2 * cfg.moe_intermediate_size * cfg.hidden_size * 4
            if impl == "batched_mm" and need > 4 * 2**30:
                ms[impl] = None
                print(f"       batched_mm at {rows} rows would gather {need / 2**30:.0f} GiB at once: not run")
                continue
            model.set_experts_implementation(impl)
            reps = 1 if impl == "batched_mm" else 3
            with torch.inference_mode():
                block(x)
                t = time.perf_counter()
                for _ in range(reps):
                    block(x)
            ms[impl] = (time.perf_counter() - t) / reps * 1000
        cell = {i: ("not run" if v is None else f"{v:.1f}ms") for i, v in ms.items()}
        print(f"{rows:6d} " + " ".join(f"{cell[i]:>12s}" for i in ms) + "   "
              + ", ".join(f"{i} {ms[i] / ms['grouped_mm']:.2f}" for i in ("eager", "batched_mm") if ms[i] is not None))


if __name__ == "__main__":
    main()
