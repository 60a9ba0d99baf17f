"""Steering benchmark: the rivalry paper's exp2 loop against qsae's batched loop, in one run.

The paper's loop (``experiments/exp2_causal.py``), restated: for every pair, multiplier and
prompt, three batch-1 ``generate`` calls (greedy, 10 new tokens): unsteered, steered along
``unit(W_dec[A] - W_dec[B])``, steered along the pair's random direction, with a forward hook
adding ``m * v`` at the last position of the layer's output. qsae's loop: per prompt one
unsteered completion, then every direction x multiplier in one batch (``qsae.lm.steer``).
Both on the same lake (SmolLM2 + the demo SAE, layer 15, a rivalry result), the same prompts,
pairs (the paper preset) and multipliers; flips compared one by one.

    .venv/bin/python benchmarks/bench_steer.py [--pairs 10] [--prompts 8] [--lake DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_lake(root: Path, questions: int) -> str:
    from qsae.jobs.capture import CaptureConfig, run_capture
    from qsae.jobs.demo import ensure_demo_model, ensure_demo_sae
    from qsae.jobs.rivalry import RivalryConfig, run_rivalry

    ensure_demo_model()
    store = str(root / "steer-bench.zarr")
    cfg = CaptureConfig(model="smollm2", sae=str(ensure_demo_sae()), layers=[15], limit=questions, n_samples=6,
                        max_new_tokens=6, questions_per_shard=8, questions_per_batch=8, device="cpu",
                        dtype="float32", store=store)
    run_capture(cfg)
    run_rivalry(RivalryConfig(store=store, rule="median", entropy="exact", n_perm=9, n_boot=0, correctness=False,
                              min_group=4))
    return store


def paper_loop(lm, plan, max_new_tokens: int = 10) -> np.ndarray:
    """Flips (rival pairs, multipliers, prompts) and of the pairs' random directions, the paper's way."""
    from transformers import GenerationConfig

    from qsae.analysis.steering import flipped
    from qsae.lm.hooks import decoder_layers

    tok, model = lm.tokenizer, lm.model
    rivals = [i for i, k in enumerate(plan.kinds) if k == "rival"]
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id,
                           eos_token_id=tok.eos_token_id)
    block = decoder_layers(model)[plan.layer]

    def generate(inputs, vec=None):
        handle = None
        if vec is not None:
            def hook(module, inp, output):
                hidden = output if isinstance(output, torch.Tensor) else output[0]
                steered = hidden.clone()
                steered[0, -1, :] += vec
                return steered if isinstance(output, torch.Tensor) else (steered,) + output[1:]
            handle = block.register_forward_hook(hook)
        try:
            with torch.no_grad():
                out = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], generation_config=gen)
        finally:
            if handle is not None:
                handle.remove()
        return tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    M, P = len(plan.multipliers), len(plan.prompts)
    flips = np.zeros((len(rivals), M, P), bool)
    flips_random = np.zeros((len(rivals), M, P), bool)
    for a, d in enumerate(rivals):
        v_b = torch.from_numpy(plan.directions[d]).float()
        v_r = torch.from_numpy(plan.directions[plan.pair_random[a]]).float()
        for j, m in enumerate(plan.multipliers):
            for p, prompt in enumerate(plan.prompts):
                inputs = tok(prompt, return_tensors="pt")
                base = generate(inputs)
                flips[a, j, p] = flipped(generate(inputs, float(m) * v_b), base)
                flips_random[a, j, p] = flipped(generate(inputs, float(m) * v_r), base)
    return flips, flips_random


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--lake", default=None, help="a lake with a rivalry result (default: build one)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import xarray as xr

    from qsae.jobs.configs import SteerConfig
    from qsae.jobs.steer import plan_steer, steer_prompts
    from qsae.lm.models import load_model

    root = Path(tempfile.mkdtemp(prefix="qsae-steer-"))
    t = time.perf_counter()
    store = args.lake or build_lake(root, args.questions)
    print(f"lake {store} ({time.perf_counter() - t:.0f} s to build)")
    lm = load_model("smollm2", device="cpu", dtype="float32")
    cfg = SteerConfig(store=store, preset="paper", pairs=args.pairs, prompts=args.prompts, device="cpu",
                      dtype="float32")
    plan = plan_steer(cfg)
    n_rival = plan.kinds.count("rival")
    M, P = len(plan.multipliers), len(plan.prompts)
    t = time.perf_counter()
    steer_prompts(plan, list(range(P)), lm=lm)
    ours_s = time.perf_counter() - t
    ds = xr.open_zarr(store, group=plan.group, consolidated=False).load()
    ours = ds.flipped.values
    t = time.perf_counter()
    ref, ref_random = paper_loop(lm, plan)
    paper_s = time.perf_counter() - t
    rival_rows = [i for i, k in enumerate(plan.kinds) if k == "rival"]
    same = int((ours[rival_rows] == ref).sum() + (ours[plan.pair_random] == ref_random).sum())
    total = ref.size + ref_random.size
    calls = 3 * n_rival * M * P
    print(f"{n_rival} pairs x {M} multipliers x {P} prompts: {2 * n_rival * M * P} steered completions")
    print("| loop | seconds | generate calls / batches | flips equal |")
    print("|---|---|---|---|")
    print(f"| the paper's (batch-1 generate, 3 per prompt, pair and multiplier) | {paper_s:.1f} | {calls} calls | "
          f"reference |")
    print(f"| qsae (one batch of every condition per prompt) | {ours_s:.1f} | {P} prompts x 2 batches | "
          f"{same} of {total} |")
    print(f"RATIO paper / qsae: {paper_s / ours_s:.1f}x; flips identical: {same == total}")


if __name__ == "__main__":
    main()
