"""knob_grpo: latency-budgeted runtime knobs for MoE vision-language models, trained with GRPO on TRL."""

from .adaptive import AdaptiveModel, ControlledGeneration, PrefixState
from .architectures import ARCHITECTURES, ArchitectureSpec, register_architecture
from .knobs import KNOB_NAMES, Knobs, KnobSpace

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "AdaptiveModel",
    "ArchitectureSpec",
    "ControlledGeneration",
    "KNOB_NAMES",
    "KnobSpace",
    "Knobs",
    "PrefixState",
    "register_architecture",
    "__version__",
]
