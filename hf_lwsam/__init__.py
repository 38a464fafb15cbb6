"""Layer-wise sharpness-aware minimization for the Hugging Face `Trainer` (Lee, KDD 2024, arXiv 2503.14205)."""

from .ascent import Ascent, register_ascent
from .config import LWSAMConfig, LWSAMConfigMixin, lwsam_config
from .host import AscentHost
from .preemption import PreemptionCallback
from .probe import probe_layer_grad_norms
from .selection import select_layers
from .selection_rules import SelectionRule, register_selection_rule
from .trainer import LWSAMMixin, LWSAMTrainer, lwsam_trainer

__all__ = [
    "Ascent",
    "AscentHost",
    "LWSAMConfig",
    "LWSAMConfigMixin",
    "LWSAMMixin",
    "LWSAMTrainer",
    "PreemptionCallback",
    "SelectionRule",
    "lwsam_config",
    "lwsam_trainer",
    "probe_layer_grad_norms",
    "register_ascent",
    "register_selection_rule",
    "select_layers",
]
__version__ = "0.1.0"
