"""Layer-wise sharpness-aware minimization for the Hugging Face `Trainer` (Lee, KDD 2024, arXiv 2503.14205)."""

from .config import LWSAMConfig
from .preemption import PreemptionCallback
from .probe import probe_layer_grad_norms
from .selection import select_layers
from .trainer import LWSAMTrainer

__all__ = ["LWSAMConfig", "LWSAMTrainer", "PreemptionCallback", "probe_layer_grad_norms", "select_layers"]
__version__ = "0.1.0"
