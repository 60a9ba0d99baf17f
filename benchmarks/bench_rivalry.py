"""Rivalry benchmark: per-question scores on a full-size lake vs the naive dense method.

Builds a question lake of 14,267 questions x 20 samples x k=50 synthetic TopK codes over
32,768 features (only the variables the study reads are filled), times ``run_rivalry`` on
the whole lake (read + score + test + write), and times the naive dense method (densify each
question to 20 x 32,768, np.corrcoef over the active non-constant columns, percentile) on a
subsample, printing the speed-up ratio and the projected full-size time of both.

Two code distributions: ``uniform`` (each sample's 50 features drawn from all 32,768: almost
every feature is active in one sample only) and ``pooled`` (drawn from a 150-feature pool
per question: most features recur across samples, the hard case for the sparse method).

    .venv/bin/python benchmarks/bench_rivalry.py [--questions 14267] [--subsample 40]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from synthetic_lake import D_SAE, K, S, build_code_lake

from qsae.analysis.rivalry import dense_question_score, question_score
from qsae.jobs.rivalry import RivalryConfig, run_rivalry
from qsae.lake.store import QuestionLake


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=14267)
    ap.add_argument("--subsample", type=int, default=40)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="qsae-riv-"))
    try:
        for kind in ("uniform", "pooled"):
            t = time.perf_counter()
            url = build_code_lake(root, args.questions, kind)
            build_s = time.perf_counter() - t
            t = time.perf_counter()
            res = run_rivalry(RivalryConfig(store=url, layer=20, n_boot=1000, block_questions=1024), log_fn=lambda m: None)
            fast_s = time.perf_counter() - t
            lake = QuestionLake.open(url)
            sub = np.random.default_rng(1).choice(args.questions, args.subsample, replace=False)
            idx = lake.arrays["codes_idx"].get_orthogonal_selection((0, np.sort(sub)))
            val = lake.arrays["codes_val"].get_orthogonal_selection((0, np.sort(sub)))
            t = time.perf_counter()
            dense = [dense_question_score(idx[i], val[i], D_SAE) for i in range(len(sub))]
            dense_s = (time.perf_counter() - t) / len(sub)
            t = time.perf_counter()
            for i in range(len(sub)):
                question_score(idx[i], val[i])
            sparse_s = (time.perf_counter() - t) / len(sub)
            fast_scores = res.per_question.score.values[np.sort(sub)]
            agree = np.nanmax(np.abs(np.array(dense) - fast_scores))
            dense_full = dense_s * args.questions
            print(f"[{kind}] lake of {args.questions} x {S} x k={K} over {D_SAE} features (built in {build_s:.0f} s)")
            print(f"  sparse method, whole lake (read + scores + MWU + bootstrap + write): {fast_s:.1f} s "
                  f"({fast_s / args.questions * 1e3:.2f} ms/question)")
            print(f"  scoring only, same {args.subsample} questions: sparse {sparse_s * 1e3:.2f} ms/question, naive dense "
                  f"{dense_s * 1e3:.2f} ms/question (RATIO dense/sparse = {dense_s / sparse_s:.1f}x)")
            print(f"  projected whole lake: naive dense scoring alone {dense_full:.0f} s vs the sparse study end to end "
                  f"{fast_s:.0f} s (RATIO {dense_full / fast_s:.1f}x); max |score difference| = {agree:.2e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
