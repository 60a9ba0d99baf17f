"""Memory per sampled row at the real Qwen3.5-35B-A3B widths: predicted (qsae.lm.memory) and
measured on this CPU, one-pass loop against the reference two-pass path, in one run.

The real ``Qwen3_5MoeTextConfig()`` (hidden 2048, vocab 248,320, 32 value heads x 128 x 128
recurrent state, 2 K/V heads x 256) with 4 of its 40 layers (3 linear-attention + 1 full, its
pattern) and 16 experts (top 8): a row's state does not depend on the expert count. Random
weights. The peak resident memory (Linux VmHWM, reset before each run) is measured at two
batch sizes and the slope is the bytes per sampled row. Then both paths are predicted at the
whole 40-layer shape in bfloat16 on a GPU (where ``generate`` switches experts to batched_mm).

    .venv/bin/python benchmarks/bench_capture_memory.py [--dtype float32] [--samples 16]
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

from qsae.lm.datasets import format_prompt, load_questions
from qsae.lm.generate import Draw, one_pass, two_pass
from qsae.lm.memory import measured_row_bytes, row_bytes
from qsae.lm.models import load_model

MB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = getattr(torch, args.dtype)
    real = Qwen3_5MoeTextConfig()
    cfg = Qwen3_5MoeTextConfig(num_hidden_layers=4, layer_types=real.layer_types[:4], num_experts=16)
    torch.manual_seed(0)
    model = Qwen3_5MoeForCausalLM(cfg).to(dtype).eval()
    tok = load_model("smollm2", device="cpu").tokenizer  # its ids fall inside the 248,320-id vocabulary
    qs = load_questions("popqa-demo", limit=8).questions
    prompts = [tok(format_prompt("Q: {question}\nA:", q)).input_ids for q in qs]
    # a random model seldom draws a newline: stop on none, every row runs max_new_tokens
    draw = Draw(n_samples=args.samples, seed=0, temperature=1.0, top_p=0.9, max_new_tokens=args.new_tokens,
                stop_ids=torch.tensor([], dtype=torch.long), pad_id=tok.pad_token_id)
    seq = max(len(p) for p in prompts) + args.new_tokens
    experts = model.get_experts_implementation()
    experts = next(iter(experts.values())) if isinstance(experts, dict) else experts
    questions = [2, 4, 8]

    def runner(fn, **kw):
        def run(rows: int) -> None:
            b = rows // args.samples
            fn(model, prompts[:b], [q.id for q in qs[:b]], draw, [2], **kw)
        return run

    runner(one_pass)(2 * args.samples)  # warm-up: allocator pools, kernels
    runner(two_pass, eos_token_id=None)(2 * args.samples)
    print(f"Qwen3.5-35B-A3B widths, 4 layers (3 linear + 1 full), 16 experts, {args.dtype}, CPU, experts "
          f"{experts}, {args.samples} samples, {args.new_tokens} new tokens, longest row {seq} tokens")
    got = {}
    for path, fn, kw in (("one_pass", one_pass, {}), ("two_pass", two_pass, {"eos_token_id": None})):
        got[path], peaks = measured_row_bytes(runner(fn, **kw), [q * args.samples for q in questions])
        pred = row_bytes(cfg, dtype, seq, path, experts)
        print(f"{path:9s} peaks {[round(p / MB) for p in peaks]} MB at {[q * args.samples for q in questions]} rows")
        print(f"{path:9s} measured {got[path] / MB:7.2f} MB/row   predicted {pred.total / MB:7.2f} MB/row "
              f"(RATIO measured/predicted {got[path] / pred.total:.2f}; "
              + ", ".join(f"{k} {v / MB:.2f}" for k, v in pred.as_dict().items() if k != "total") + ")")
    print(f"RATIO one_pass/two_pass measured = {got['one_pass'] / got['two_pass']:.3f}")
    full_new = row_bytes(real, torch.bfloat16, seq, "one_pass", "grouped_mm", "fla")
    full_old = row_bytes(real, torch.bfloat16, seq, "two_pass", "batched_mm", "fla")
    print(f"predicted at the whole 40-layer shape, bfloat16, GPU with flash-linear-attention: one_pass (grouped_mm) {full_new.total / MB:.1f} MB/row, "
          f"two_pass (generate, batched_mm) {full_old.total / MB:.1f} MB/row, RATIO {full_new.total / full_old.total:.3f}")
    print("  one_pass: " + ", ".join(f"{k} {v / MB:.1f}" for k, v in full_new.as_dict().items()))
    print("  two_pass: " + ", ".join(f"{k} {v / MB:.1f}" for k, v in full_old.as_dict().items()))


if __name__ == "__main__":
    main()
