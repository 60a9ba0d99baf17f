"""Capture benchmark on SmolLM2: capture wall time vs bare generate + forward on the same batches.

Baseline ("bare"): for each batch of the same questions, transformers' own sampling
(``generate(do_sample=True, temperature, top_p, num_return_sequences=S)``, same stop rule)
followed by one plain forward pass over prompt + completion (full model, no hooks).
Capture: ``qsae.jobs.capture.capture_shards`` on the same questions and batch size (seeded
sampler, one hooked forward stopping after the deepest layer, on-device SAE codes, float16
conversion, background shard writes, fsync). Prints the ratio and a phase breakdown, then
the write throughput against a raw numpy write + fsync of the same bytes.

    .venv/bin/python benchmarks/bench_capture.py [--questions 16] [--samples 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_lake_layout import raw_write_fsync
from transformers import GenerationConfig, StoppingCriteriaList

from qsae.jobs.capture import CaptureConfig, _encode_prompt, capture_shards, get_model, get_questions, plan_capture
from qsae.lm.sampling import StopOnTokens, newline_token_ids


def bare(cfg: CaptureConfig, questions) -> tuple[float, int, float, float]:
    """(total seconds, new tokens, generate seconds, forward seconds) of the baseline."""
    lm = get_model(cfg).lm
    tok, model = lm.tokenizer, lm.model
    t0 = time.perf_counter()
    new_tokens, gen_s, fwd_s = 0, 0.0, 0.0
    for start in range(0, len(questions), cfg.questions_per_batch):
        batch = questions[start:start + cfg.questions_per_batch]
        enc = tok([tok.decode(_encode_prompt(lm, cfg, q)) for q in batch], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        P = enc.input_ids.shape[1]
        gen = GenerationConfig(do_sample=True, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, top_k=0,
                               max_new_tokens=cfg.sampling.max_new_tokens, num_return_sequences=cfg.sampling.n_samples,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(**enc, generation_config=gen,
                                 stopping_criteria=StoppingCriteriaList([StopOnTokens(newline_token_ids(tok), P)]))
            gen_s += time.perf_counter() - t
            mask = torch.cat([enc.attention_mask.repeat_interleave(cfg.sampling.n_samples, 0),
                              torch.ones_like(out[:, P:])], dim=1)
            t = time.perf_counter()
            model(input_ids=out, attention_mask=mask, use_cache=False)
            fwd_s += time.perf_counter() - t
        new_tokens += int((out[:, P:] != tok.pad_token_id).sum())
    return time.perf_counter() - t0, new_tokens, gen_s, fwd_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sae", default=None, help="SAE folder (default: the demo SAE, trained if missing)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.sae is None:
        from qsae.jobs.demo import ensure_demo_sae

        args.sae = str(ensure_demo_sae())
    root = Path(tempfile.mkdtemp(prefix="qsae-bench-cap-"))
    try:
        cfg = CaptureConfig(model="smollm2", sae=args.sae, layers=[15], limit=args.questions, n_samples=args.samples,
                            max_new_tokens=12, questions_per_shard=args.batch, questions_per_chunk=4,
                            questions_per_batch=args.batch, device="cpu", dtype="float32", store=str(root / "lake.zarr"))
        questions = get_questions(cfg).questions
        # Warm up both paths once (first calls allocate and build kernels).
        bare(cfg.model_copy(update={"limit": 2, "questions_per_batch": 2}), questions[:2])
        warm = cfg.model_copy(update={"store": str(root / "warm.zarr"), "limit": args.batch})
        capture_shards(warm, plan_capture(warm).pending)
        torch.manual_seed(0)
        bare_s, bare_tokens, bare_gen, bare_fwd = bare(cfg, questions)
        plan = plan_capture(cfg)
        stats = capture_shards(cfg, plan.pending)
        print(f"SmolLM2-135M, layer 15, {args.questions} PopQA questions x {args.samples} samples, batch {args.batch} "
              f"questions, max 12 new tokens, {torch.get_num_threads()} threads")
        ph = stats.phase_seconds
        print(f"bare generate + forward: {bare_s:.1f} s ({bare_tokens} new tokens): generate {bare_gen:.1f} s, "
              f"full forward {bare_fwd:.1f} s")
        print(f"qsae capture:            {stats.wall_seconds:.1f} s ({stats.new_tokens} new tokens): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items())
              + f", other {stats.wall_seconds - sum(ph.values()):.2f} s; writer {stats.write_seconds:.2f} s in the background")
        print(f"RATIO capture/bare = {stats.wall_seconds / bare_s:.3f} (the hooked forward stops after layer 15 and "
              "skips the LM head, the bare one runs the whole model)")
        overhead = ph.get("encode_and_convert", 0.0) + (stats.wall_seconds - sum(ph.values()))
        print(f"RATIO overhead (SAE encode + dtype conversion + shard assembly + writer wait) / capture = "
              f"{overhead / stats.wall_seconds:.4f}; seeded sampler generate / HF generate = {ph['generate'] / bare_gen:.3f}")
        # Write throughput: the writer's bytes vs a raw numpy write + fsync of the same arrays.
        from qsae.lake.store import QuestionLake

        lake = QuestionLake.open(cfg.store)
        arrays = {name: np.asarray(arr[:]) for name, arr in lake.arrays.items() if arr.dtype.kind not in "TUO"}
        nbytes = sum(a.nbytes for a in arrays.values())
        raw_s = raw_write_fsync(root, arrays)
        print(f"writer: {stats.bytes_written / stats.write_seconds / 1e6:.1f} MB/s ({stats.bytes_written / 1e6:.2f} MB in "
              f"{stats.write_seconds:.2f} s, in the background)   raw numpy+fsync: {nbytes / raw_s / 1e6:.1f} MB/s   "
              f"RATIO writer/raw = {(stats.bytes_written / stats.write_seconds) / (nbytes / raw_s):.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
