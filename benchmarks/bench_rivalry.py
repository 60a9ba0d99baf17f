"""Rivalry benchmark: the paper protocol at full scale, against the paper's dense method.

Builds a question lake of 14,267 questions x 20 samples x k=50 TopK codes over 32,768
features (Zipf-popular features, first-word entropy spread over [0, 1]) and measures, in a
child process each (so peak RSS is the step's own):

1. ``run_rivalry`` with the paper defaults and 1,000 label permutations on one layer
   (read, groups, p5, feature-marginal null, MWU, calibrated test, write, figures);
2. the baseline in the same run: the paper's dense method (the group's question x 32,768
   matrix, mean filter, cap, ``np.corrcoef``), timed on the observed statistic and on a few
   permutations, projected to 1,000 permutations; the ratio is printed;
3. no feature cap (every feature active in >= 5 questions): the exact p5 of all pairs in
   bounded memory, against the F x F matrix the dense method would need.

``--calibration`` (or ``--only-calibration``) also prints the design table: candidate designs of
the calibrated test x lakes of known truth (TopK and ReLU-style, no rivalry difference or planted
rivalry) at 448/64, 64/448 and 256/256, over ``--seeds`` seeds.

    .venv/bin/python benchmarks/bench_rivalry.py [--questions 14267] [--calibration] [--seeds 10 --perms 99]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from synthetic_lake import D_SAE, K, S, build_prompt_lake

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' lake generators


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _paper_default(url: str, q: mp.Queue) -> None:
    from qsae.jobs.rivalry import RivalryConfig, run_rivalry

    t = time.perf_counter()
    res = run_rivalry(RivalryConfig(store=url, correctness=False))
    s = time.perf_counter() - t
    r = res.summary["by_layer"][20]
    q.put({"seconds": s, "peak_gb": _peak_gb(), "p_cal": r["calibrated"]["p_less"], "p_paper": r["paper"]["p_less"],
           "amb": r["ambiguous"], "unamb": r["unambiguous"], "groups": res.summary["groups"]})


def _dense_baseline(url: str, n_perm: int, q: mp.Queue) -> None:
    """The paper's way: dense group matrices, np.corrcoef; timed per evaluation of both groups."""
    import xarray as xr

    from qsae.analysis.rivalry import entropy_groups, first_word_entropy

    ds = xr.open_zarr(url)
    H = first_word_entropy(ds.completion.values)
    g = entropy_groups(H)
    idx = ds.prompt_codes_idx.values[0].astype(np.int64)
    val = ds.prompt_codes_val.values[0].astype(np.float64)
    pooled = np.flatnonzero(g.labels != "")
    amb = g.labels[pooled] == "ambiguous"

    def p5(rows):
        m = np.zeros((rows.size, D_SAE))
        np.put_along_axis(m, idx[rows], val[rows], axis=1)
        active = np.where(m.mean(axis=0) > 0.01)[0]
        if active.size > 300:
            active = np.random.RandomState(42).choice(active, 300, replace=False)
        c = np.corrcoef(m[:, active].T)
        return np.percentile(c[np.triu_indices_from(c, 1)], 5)

    t = time.perf_counter()
    obs = (p5(pooled[amb]), p5(pooled[~amb]))
    one = time.perf_counter() - t
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(n_perm):
        lab = rng.permutation(amb)
        p5(pooled[lab]), p5(pooled[~lab])
    per_perm = (time.perf_counter() - t) / max(n_perm, 1)
    # the paper's method has no null; the calibrated test needs two evaluations per group
    q.put({"observed_s": one, "per_perm_s": 2 * per_perm, "p5": obs, "peak_gb": _peak_gb()})


def _uncapped(url: str, q: mp.Queue) -> None:
    from qsae.jobs.rivalry import RivalryConfig, run_rivalry

    t = time.perf_counter()
    res = run_rivalry(RivalryConfig(store=url, correctness=False, max_features=None, min_mean=0.0, min_questions=5,
                                    n_perm=0))
    r = res.summary["by_layer"][20]
    q.put({"seconds": time.perf_counter() - t, "peak_gb": _peak_gb(), "amb": r["ambiguous"], "unamb": r["unambiguous"]})


def _child(fn, *args):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def calibration(seeds: int, n_perm: int, settings: list[str] | None = None) -> None:
    """The design table: candidate designs x lakes of known truth at 64/448, 448/64 and 256/256
    (tests/analysis/lakes.py at the study's size: TopK codes of exactly 50 features from pools
    of 400 and 8,000, with answer diversity, with relation strata, the same rivalry in both
    groups; ReLU-style frequency and diversity lakes; planted rivalry). One run of the default
    design (fixed-fixed null, both references) gives three candidates (its conditional and
    relabelling p-values and their maximum); a second run gives the feature-marginal null with
    relabellings. Per cell: seeds with p <= 0.05, mean p, one-sided KS p (p-values pushed to 0)."""

    import scipy.stats

    from qsae.analysis.rivalry import PaperParams, calibrated_test
    from tests.analysis.lakes import NULL_SETTINGS, POWER_SETTINGS, SPLITS, make  # the tests' generators

    base = PaperParams()
    candidates = ["feature-marginal, relabel", "fixed-fixed, relabel", "fixed-fixed, conditional",
                  "fixed-fixed, both (default)"]
    print(f"\ndesign table: {seeds} seeds per cell, {n_perm} draws per reference (resolution {1 / (n_perm + 1):.3f})")
    print("| lake | split | " + " | ".join(candidates) + " |")
    print("|---|---|" + "---|" * len(candidates))
    for name in settings or NULL_SETTINGS + POWER_SETTINGS:
        for na, nu in SPLITS:
            t = time.perf_counter()
            ps = {c: [] for c in candidates}
            for s in range(seeds):
                X, amb, strata = make(name, np.random.default_rng(10_000 + s), na, nu)
                both = calibrated_test(X, amb, base, n_perm=n_perm, seed=s, strata=strata)
                fm = calibrated_test(X, amb, base.model_copy(update=dict(null="feature_marginal", reference="relabel")),
                                     n_perm=n_perm, seed=s, strata=strata)
                for c, p in zip(candidates, (fm.p_less, both.components["relabel"].p_less,
                                             both.components["conditional"].p_less, both.p_less)):
                    ps[c].append(np.nan if p is None else p)
            cells = []
            for c in candidates:
                p = np.array(ps[c])
                ks = scipy.stats.kstest(p[np.isfinite(p)], "uniform", alternative="greater").pvalue
                cells.append(f"{int((p <= 0.05).sum())}/{seeds}, {np.nanmean(p):.2f}, KS {ks:.2g}")
            truth = "planted rivalry" if name in POWER_SETTINGS else "no difference"
            print(f"| {name} ({truth}) | {na}/{nu} | " + " | ".join(cells) + f" |  ({time.perf_counter() - t:.0f} s)",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=14267)
    ap.add_argument("--dense-perms", type=int, default=3)
    ap.add_argument("--calibration", action="store_true")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--perms", type=int, default=99, help="--calibration: draws per reference")
    ap.add_argument("--settings", default=None, help="--calibration: comma-separated lakes (default: all)")
    ap.add_argument("--only-calibration", action="store_true", help="skip the full-scale study")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if args.only_calibration:
        calibration(args.seeds, args.perms, args.settings.split(",") if args.settings else None)
        return
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="qsae-riv-"))
    try:
        t = time.perf_counter()
        url = build_prompt_lake(root, args.questions)
        print(f"lake: {args.questions} questions x {S} samples x k={K} over {D_SAE} features "
              f"(built in {time.perf_counter() - t:.0f} s)")
        fast = _child(_paper_default, url)
        g = fast["groups"]
        print(f"groups: {g['ambiguous']['n']} ambiguous, {g['unambiguous']['n']} unambiguous, {g['left_out']} left out")
        print(f"paper default + calibrated test (1,000 permutations), one layer: {fast['seconds']:.1f} s, "
              f"peak RSS {fast['peak_gb']:.2f} GB; p5 amb {fast['amb']['p5']:.4f} (null {fast['amb']['null_p5']:.4f}), "
              f"unamb {fast['unamb']['p5']:.4f} (null {fast['unamb']['null_p5']:.4f}); calibrated p {fast['p_cal']:.3f}, "
              f"paper MWU p {fast['p_paper']:.3g}")
        dense = _child(_dense_baseline, url, args.dense_perms)
        proj = dense["observed_s"] + 1000 * dense["per_perm_s"]
        print(f"baseline, the paper's dense method: observed p5 of both groups {dense['observed_s']:.2f} s "
              f"(p5 {dense['p5'][0]:.4f} / {dense['p5'][1]:.4f}: equal to qsae's), one permutation with its null "
              f"{dense['per_perm_s']:.2f} s, projected 1,000 permutations {proj:.0f} s, peak RSS {dense['peak_gb']:.2f} GB")
        print(f"RATIO dense / qsae, 1,000-permutation study: {proj / fast['seconds']:.1f}x")
        unc = _child(_uncapped, url)
        F = unc["amb"]["n_features"]
        print(f"no cap (features active in >= 5 questions): {unc['amb']['n_features']} / {unc['unamb']['n_features']} "
              f"features, {unc['amb']['n_pairs'] + unc['unamb']['n_pairs']:,} pairs, exact p5 "
              f"{unc['amb']['p5']:.4f} / {unc['unamb']['p5']:.4f} with one null draw each, {unc['seconds']:.0f} s, "
              f"peak RSS {unc['peak_gb']:.2f} GB (a dense F x F float64 matrix: {F * F * 8 / 2**30:.1f} GB per group)")
        if args.calibration:
            calibration(args.seeds, args.perms, args.settings.split(",") if args.settings else None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
