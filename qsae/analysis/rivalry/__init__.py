"""Feature rivalry: entropy groups, feature correlations, the paper's test and calibrated ones.

The protocol (the default) is the one of "Feature Rivalry in SAE Representations" (arXiv
2605.08149) and its public code, restated so every step can be checked:

* Entropy (``grouping``): the first word of each of the S sampled completions
  (``text.strip().split()[0].lower()``, ``""`` for an empty completion); the Shannon entropy
  of their empirical distribution divided by log S. Ambiguous H > 0.7, unambiguous H < 0.5,
  the questions between left out.
* Activations: the SAE codes at the prompt's last token, one row per question.
* Within each group (``correlations``, ``paper``): features whose mean activation over the
  group's questions (zeros included) is > 0.01; above 300, 300 of them chosen by
  ``np.random.RandomState(42).choice(active, 300, replace=False)``; the Pearson correlations of
  all pairs across the group's questions; their 5th percentile, p5.
* The paper's test: ``mannwhitneyu(pairs_ambiguous, pairs_unambiguous, alternative="less")``:
  descriptive only (pairs are not independent draws; p5 moves with firing frequency alone).

What qsae adds: the calibrated test of the excess structure at equal group sizes
(``paper.calibrated_test``, its design in that module's docstring), optionally within strata of
a question covariate; per-question scores over distinct completions (``per_question``,
descriptive); the per-prompt decoder-cosine score against correctness with paired bootstrap
CIs (``scores``); Holm across layers. Everything is numpy/scipy on sparse codes.
"""

from qsae.analysis.params import PaperParams

from .correlations import (
    DENSE_FEATURES,
    blocked_pair_percentile,
    codes_matrix,
    constant_columns,
    curveball,
    pair_correlations,
    percentile,
    permute_columns,
    select_features,
)
from .grouping import (
    AMBIGUOUS,
    EXCLUDED,
    NOT_CAPTURED,
    UNAMBIGUOUS,
    Grouping,
    Rule,
    distinct_rows,
    entropy_groups,
    first_word,
    first_word_entropy,
)
from .paper import (
    MWU,
    Calibrated,
    Component,
    GroupStats,
    RivalryTest,
    calibrated_test,
    group_stats,
    null_draw,
    paper_mwu,
    rivalry_test,
)
from .per_question import (
    GroupComparison,
    QuestionScore,
    StratifiedTest,
    compare_groups,
    question_score,
    score_questions,
    stratified_permutation_test,
    weighted_percentile,
)
from .scores import PairedAUROC, auroc, auroc_with_ci, decoder_cosine_score, holm, paired_auroc, roc_curve

__all__ = [
    "AMBIGUOUS", "DENSE_FEATURES", "EXCLUDED", "MWU", "NOT_CAPTURED", "UNAMBIGUOUS", "Calibrated", "Component",
    "GroupComparison", "GroupStats", "PairedAUROC", "StratifiedTest",
    "Grouping", "PaperParams", "QuestionScore", "RivalryTest", "Rule", "auroc", "auroc_with_ci",
    "blocked_pair_percentile", "calibrated_test", "codes_matrix", "compare_groups", "constant_columns", "curveball",
    "decoder_cosine_score", "distinct_rows", "entropy_groups", "first_word", "first_word_entropy", "group_stats",
    "holm", "null_draw", "paired_auroc", "pair_correlations", "paper_mwu", "percentile", "permute_columns", "question_score",
    "rivalry_test", "roc_curve", "score_questions", "select_features", "stratified_permutation_test",
    "weighted_percentile",
]
