"""The rivalry study on a question lake, every captured layer, results written into the store.

One module a concern: ``plan`` (the layer-independent question table, read once), ``layers``
(what each protocol computes at one layer, as typed results), ``study`` (the stages a flow
composes: plan -> a task per layer -> finish), ``report`` (the result, rendered for the
terminal, the artifact and JSON), ``figures``. Definitions: ``qsae.analysis.rivalry``.
"""

from qsae.jobs.configs import RivalryConfig

from .figures import by_layer_figure, groups_figure, roc_figure
from .layers import (
    PROTOCOLS,
    Correctness,
    LayerResult,
    PaperLayer,
    PaperProtocol,
    PerQuestionLayer,
    PerQuestionProtocol,
    Protocol,
    _decoder,
    correctness,
)
from .plan import (
    CORRECT_LABEL,
    ENTROPY_NAMES,
    MAX_PROB,
    NEG_ENTROPY,
    NULL_NAMES,
    PREDICTORS,
    SCORE,
    RivalryPlan,
    composition,
    plan_rivalry,
    question_entropy,
    resolve_layers,
    resolve_strata,
    result_group,
)
from .report import RivalryResult, groups_line, png_data_uri
from .study import finish_rivalry, rivalry_layer, run_rivalry

__all__ = [
    "CORRECT_LABEL", "ENTROPY_NAMES", "MAX_PROB", "NEG_ENTROPY", "NULL_NAMES", "PREDICTORS", "PROTOCOLS", "SCORE",
    "Correctness", "LayerResult", "PaperLayer", "PaperProtocol", "PerQuestionLayer", "PerQuestionProtocol", "Protocol",
    "RivalryConfig", "RivalryPlan", "RivalryResult", "_decoder", "by_layer_figure", "composition", "correctness",
    "finish_rivalry", "groups_figure", "groups_line", "plan_rivalry", "png_data_uri", "question_entropy",
    "resolve_layers", "resolve_strata", "result_group", "rivalry_layer", "roc_figure", "run_rivalry",
]
