"""knob_grpo: latency-budgeted runtime knobs for MoE vision-language models, trained with GRPO on TRL."""

from .adaptive import AdaptiveModel, ControlledGeneration, PrefixState
from .architectures import ARCHITECTURES, ArchitectureSpec, register_architecture
from .config import KnobGRPOConfig
from .controller import ControllerConfig, TwoStageController
from .evaluation import EvaluationResult, evaluate_budgets
from .knobs import KNOB_NAMES, Knobs, KnobSpace
from .latency import LatencyMeasurement, LatencyMeter, LatencyProfile
from .profiling import fit_profile, profile_executor
from .trainer import KnobGRPOTrainer

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "AdaptiveModel",
    "ArchitectureSpec",
    "ControlledGeneration",
    "ControllerConfig",
    "EvaluationResult",
    "KnobGRPOConfig",
    "KnobGRPOTrainer",
    "TwoStageController",
    "KNOB_NAMES",
    "KnobSpace",
    "Knobs",
    "LatencyMeasurement",
    "LatencyMeter",
    "LatencyProfile",
    "PrefixState",
    "evaluate_budgets",
    "fit_profile",
    "profile_executor",
    "register_architecture",
    "__version__",
]
