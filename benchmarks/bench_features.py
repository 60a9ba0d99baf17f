"""Feature dashboards at full scale: a layer of 32,768 features over 14,267 questions x 20
samples (a synthetic lake, Zipf-popular TopK codes, k 50), against the naive way in the same run.

qsae features: one pass over the layer's sparse codes (``qsae.analysis.features``) and the
dashboard written block by block. Baseline: what a researcher writes with the accessor today,
one ``ds.qsae.top_questions`` per feature (each decodes the whole layer's codes), timed on 8
features and projected to every feature that fires. Prints wall time and peak RSS (target:
<= 5 minutes and <= 4 GB on this 2-core machine), the largest data block a feature page loads,
and, when Chromium is installed, how long a browser takes to open a feature page.

    .venv/bin/python benchmarks/bench_features.py [--questions 14267]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from synthetic_lake import build_prompt_lake

from qsae.jobs.features import FeaturesConfig, run_features
from qsae.lake.store import open_lake
from qsae.lm.memory import peak_rss, reset_peak_rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=14267)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="qsae-bench-features-"))
    try:
        t = time.perf_counter()
        url = build_prompt_lake(root, args.questions)
        print(f"synthetic lake: {args.questions} questions x 20 samples x k 50 over 32,768 features "
              f"(built in {time.perf_counter() - t:.0f} s)")
        reset_peak_rss()
        before = peak_rss() or 0
        t = time.perf_counter()
        res = run_features(FeaturesConfig(store=url, logit_effects=False))
        wall = time.perf_counter() - t
        peak = (peak_rss() or 0) - before
        info = res.layers[20]
        index = Path(info["index"])
        blocks = sorted((index.parent / "data").glob("block_*.js"))
        biggest = max(b.stat().st_size for b in blocks)
        print(f"qsae features: {wall:.0f} s, peak RSS +{peak / 2**30:.2f} GiB, {info['features']} features, "
              f"{len(blocks)} data blocks (largest {biggest / 2**20:.1f} MB), index {index.stat().st_size / 2**20:.1f} MB")
        ds = open_lake(url)
        firing = info["features"]
        t = time.perf_counter()
        for f in range(8):
            ds.qsae.top_questions(f, layer=20, n=10, which="prompt")
        per = (time.perf_counter() - t) / 8
        print(f"baseline, ds.qsae.top_questions per feature: {per:.2f} s each, projected {per * firing / 60:.0f} min "
              f"for {firing} features (top questions only)")
        print(f"RATIO baseline/qsae features = {per * firing / wall:.1f}x")
        exe = shutil.which("chromium")
        if exe:
            page = index.parent / "feature.html"
            times = []
            for f in (0, 16000, 32767):
                t = time.perf_counter()
                subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                                page.as_uri() + f"#{f}"], check=True, capture_output=True, timeout=120)
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "about:blank"],
                           check=True, capture_output=True, timeout=120)
            blank = time.perf_counter() - t
            print(f"headless Chromium, a feature page: {', '.join(f'{x:.2f}' for x in times)} s "
                  f"(an empty page: {blank:.2f} s, the browser's own start)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
