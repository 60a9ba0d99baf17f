"""Capture benchmark on SmolLM2: the one-pass loop against the two-pass path and stock transformers.

In one run, on the same questions and batches: stock transformers (``generate(do_sample=True,
temperature, top_p, num_return_sequences=S)``, same stop rule, then one plain forward over
prompt + completion); qsae capture with ``decode="two_pass"`` (the path before issue 24:
generate on every prompt x S, then a hooked forward); qsae capture with the one-pass loop
(each prompt prefilled once, activations captured while decoding). Both captures include the
SAE codes, float16 conversion and background shard writes. Prints new tokens/s, the ratios,
the phases, the peak RSS of each, how many sampled rows drew the same completion in both
captures, and the writer's throughput against a raw numpy write + fsync.

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
from qsae.lm.memory import peak_rss, reset_peak_rss
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


def _capture(cfg: CaptureConfig) -> tuple[object, int | None]:
    reset_peak_rss()
    before = peak_rss()
    plan = plan_capture(cfg)
    stats = capture_shards(plan, plan.pending)
    after = peak_rss()
    return stats, (after - before) if before is not None and after is not None else None


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
        paths = {p: cfg.model_copy(update={"decode": p, "store": str(root / f"{p}.zarr")}) for p in ("one_pass", "two_pass")}
        questions = get_questions(cfg).questions
        # Warm up every path once (first calls allocate and build kernels).
        bare(cfg.model_copy(update={"limit": 2, "questions_per_batch": 2}), questions[:2])
        for p, c in paths.items():
            warm = c.model_copy(update={"store": str(root / f"warm-{p}.zarr"), "limit": args.batch})
            warm_plan = plan_capture(warm)
            capture_shards(warm_plan, warm_plan.pending)
        torch.manual_seed(0)
        reset_peak_rss()
        before = peak_rss()
        bare_s, bare_tokens, bare_gen, bare_fwd = bare(cfg, questions)
        bare_rss = (peak_rss() or 0) - (before or 0)
        results = {p: _capture(c) for p, c in paths.items()}
        # the path exactly as before issue 24: two-pass with the sampler sorting the whole vocabulary
        import qsae.lm.sampling as sampling

        saved, sampling.NUCLEUS_CANDIDATES = sampling.NUCLEUS_CANDIDATES, 1 << 30
        try:
            results["before"] = _capture(paths["two_pass"].model_copy(update={"store": str(root / "before.zarr")}))
        finally:
            sampling.NUCLEUS_CANDIDATES = saved
        print(f"SmolLM2-135M, layer 15, demo SAE, {args.questions} PopQA questions x {args.samples} samples, batch "
              f"{args.batch} questions, max 12 new tokens, {torch.get_num_threads()} threads, CPU")
        print(f"{'path':34s} {'seconds':>8s} {'new tok':>8s} {'new tok/s':>10s} {'peak RSS MB':>12s}  phases")
        print(f"{'stock transformers generate+fwd':34s} {bare_s:8.1f} {bare_tokens:8d} {bare_tokens / bare_s:10.1f} "
              f"{bare_rss / 2**20:12.0f}  generate {bare_gen:.1f} s, full forward {bare_fwd:.1f} s")
        for p, (stats, rss) in results.items():
            ph = stats.phase_seconds
            label = {"one_pass": "qsae capture, one-pass loop", "two_pass": "qsae capture, two-pass",
                     "before": "qsae capture before (two-pass, sort)"}[p]
            print(f"{label:34s} {stats.wall_seconds:8.1f} {stats.new_tokens:8d} {stats.new_tokens / stats.wall_seconds:10.1f} "
                  f"{(rss or 0) / 2**20:12.0f}  " + ", ".join(f"{k} {v:.2f} s" for k, v in ph.items())
                  + f", other {stats.wall_seconds - sum(ph.values()):.2f} s")
        one, two, old = results["one_pass"][0], results["two_pass"][0], results["before"][0]
        print(f"RATIO speed one_pass/before = {old.wall_seconds / one.wall_seconds:.2f}x   "
              f"one_pass/two_pass = {two.wall_seconds / one.wall_seconds:.2f}x   "
              f"one_pass/stock transformers = {bare_s / one.wall_seconds:.2f}x (stock: its own sampler, no hooks, "
              f"no SAE, no writes)")
        from qsae.lake.store import QuestionLake, open_lake  # noqa: F401

        a = open_lake(paths["one_pass"].store).load()
        b = open_lake(paths["two_pass"].store).load()
        same = (a.completion_ids.values == b.completion_ids.values).all(-1)
        print(f"same completions: {int(same.sum())} of {same.size} sampled rows "
              f"({int((~same).sum())} flipped by last-bit differences)")
        ph = one.phase_seconds
        overhead = ph.get("encode_and_convert", 0.0) + (one.wall_seconds - sum(ph.values()))
        print(f"RATIO overhead (SAE encode + dtype conversion + shard assembly + writer wait) / capture = "
              f"{overhead / one.wall_seconds:.4f}")
        # Write throughput: the writer's bytes vs a raw numpy write + fsync of the same arrays.
        lake = QuestionLake.open(paths["one_pass"].store)
        arrays = {name: np.asarray(arr[:]) for name, arr in lake.arrays.items() if arr.dtype.kind not in "TUO"}
        nbytes = sum(x.nbytes for x in arrays.values())
        raw_s = raw_write_fsync(root, arrays)
        print(f"writer: {one.bytes_written / one.write_seconds / 1e6:.1f} MB/s ({one.bytes_written / 1e6:.2f} MB in "
              f"{one.write_seconds:.2f} s, in the background)   raw numpy+fsync: {nbytes / raw_s / 1e6:.1f} MB/s   "
              f"RATIO writer/raw = {(one.bytes_written / one.write_seconds) / (nbytes / raw_s):.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
