"""knob_grpo: latency-budgeted runtime knobs for MoE vision-language models, trained with GRPO on TRL.

The flow, one module per role:

* :class:`KnobSpace` / :class:`Knobs` (``knobs``): the four knobs (``tier``, ``insertion_position``,
  ``top_k``, ``num_active_blocks``), their options and constraints.
* :class:`AdaptiveModel` (``adaptive``): a frozen transformers model whose ``generate`` runs in a
  chosen knob configuration; ``prefill`` to block ``p`` and continue; per-architecture knowledge
  in ``architectures``.
* :class:`TwoStageController` (``controller``): request + budget -> knobs; a ``PreTrainedModel``.
* ``latency`` / ``profiling``: measured latency, per-device latency profiles, decision overhead.
* ``rewards``: TRL-signature reward functions (answer accuracy, budget).
* :class:`KnobGRPOTrainer` / :class:`KnobGRPOConfig` (``trainer``, ``config``): GRPO over knob tuples.
* :func:`evaluate_budgets` (``evaluation``): the budget sweep against the lookup table, the full
  model and the oracle.
* ``embedded``: the default executor and task that ``examples/train.py`` runs.
"""

from .adaptive import AdaptiveModel, ControlledGeneration, PrefixState
from .architectures import ARCHITECTURES, ArchitectureSpec, register_architecture
from .config import KnobGRPOConfig
from .controller import (
    BELOW_RANGE,
    STAGE2_MODES,
    ControllerConfig,
    ControllerOutput,
    KnobLogProbs,
    KnobSample,
    TwoStageController,
    language_features,
    prompt_features,
)
from .evaluation import EvaluationResult, evaluate_budgets
from .knobs import KNOB_NAMES, Knobs, KnobSpace
from .latency import LatencyMeasurement, LatencyMeter, LatencyProfile
from .processing import image_only_processor, load_processor
from .profiling import (
    fit_profile,
    measure_decision_overhead,
    profile_executor,
    suggest_budget_range,
    suggest_latency_margin,
    suggest_latency_scale,
)
from .trainer import KnobGRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "AdaptiveModel",
    "ArchitectureSpec",
    "ControlledGeneration",
    "ControllerConfig",
    "ControllerOutput",
    "EvaluationResult",
    "KnobGRPOConfig",
    "KnobGRPOTrainer",
    "TwoStageController",
    "KNOB_NAMES",
    "KnobLogProbs",
    "KnobSample",
    "KnobSpace",
    "Knobs",
    "LatencyMeasurement",
    "LatencyMeter",
    "LatencyProfile",
    "PrefixState",
    "BELOW_RANGE",
    "STAGE2_MODES",
    "evaluate_budgets",
    "fit_profile",
    "image_only_processor",
    "language_features",
    "load_processor",
    "measure_decision_overhead",
    "profile_executor",
    "prompt_features",
    "register_architecture",
    "suggest_budget_range",
    "suggest_latency_margin",
    "suggest_latency_scale",
    "__version__",
]
