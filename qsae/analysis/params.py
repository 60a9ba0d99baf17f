"""The analyses' parameters (pydantic only: the job configs nest them, torch- and numpy-free).

The knobs of the across-question protocol (defaults: the paper's) and of the calibrated test,
in one described model: ``RivalryConfig.paper`` nests it (its fields also given flat, ``--set
n_perm=...`` style), the analysis functions take it. Imports pydantic only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Null = Literal["fixed_fixed", "feature_marginal"]
Reference = Literal["both", "conditional", "relabel"]


class PaperParams(BaseModel):
    """The paper's per-group statistics and the calibrated test's design."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    percentile: float = Field(5.0, gt=0, lt=100, description="the percentile of pair correlations (p5)")
    min_mean: float = Field(0.01, ge=0, description="keep features with mean activation above this")
    max_features: int | None = Field(300, ge=2, description="at most this many features (random, feature_seed); "
                                                            "None: all (p5 in bounded memory)")
    feature_seed: int = Field(42, description="seed of the feature cap's random choice")
    min_questions: int = Field(1, ge=1, description="keep features active in at least this many questions")
    null: Null = Field("fixed_fixed", description="calibrated test's null: fixed_fixed keeps each question's count "
                                                  "of active features (TopK's k) and each feature's values; "
                                                  "feature_marginal does not (it reads TopK's fixed count as "
                                                  "rivalry; kept for comparison)")
    reference: Reference = Field("both", description="calibrated test's reference: both (the larger p of the two), "
                                                     "conditional (the groups' own null), relabel (permuted question "
                                                     "labels)")
    rounds: int = Field(3, ge=1, description="curveball rounds per fixed-fixed null draw")
    n_null: int = Field(1, ge=1, description="null draws per excess in each relabelling of the calibrated test")
    report_draws: int = Field(10, ge=1, description="null draws for the descriptive per-group null p5")
    replicates: int = Field(8, ge=0, description="further evaluations of the observed statistic (new blocks and "
                                                 "null draws): its Monte-Carlo noise, in the p-value's error")
    min_group: int = Field(20, ge=2, description="fewest questions a group needs for a calibrated p-value "
                                                 "(below it the layer says why there is none)")
    min_stratum: int = Field(10, ge=2, description="fewest questions of each group a stratum needs to count")
