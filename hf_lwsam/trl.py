"""LW-SAM inside TRL's trainers: `SFTLWSAMTrainer` / `SFTLWSAMConfig`, `DPOLWSAMTrainer` / `DPOLWSAMConfig` and
`GRPOLWSAMTrainer` / `GRPOLWSAMConfig`.

Each is built by the two factories, [`lwsam_trainer`] and [`lwsam_config`], so it is TRL's own trainer and config
(data handling, defaults, metrics, model card) with the LW-SAM step and the `sam_*` options added:

    from hf_lwsam.trl import SFTLWSAMConfig, SFTLWSAMTrainer

    args = SFTLWSAMConfig(output_dir="out", sam_rho=0.05)  # every SFTConfig option and default, plus sam_*
    SFTLWSAMTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()

TRL's metrics (`num_tokens`, `entropy`, `mean_token_accuracy`, DPO's `rewards/*`, `logps/*`, `logits/*`) are recorded
once per micro-batch, from the pass whose loss is logged: the clean pass 1 with the exact ascent, the perturbed pass
with a one-pass ascent.

GRPO: `GRPOTrainer._prepare_inputs` generates and scores completions (and, when the steps and generations are not
aligned, the old log-probabilities) once per generation batch and buffers them; it runs once per micro-batch, at the
unperturbed weights w, before either pass, and both passes compute GRPO's loss on the batch it returned: the ascent
gradient at w and the descent gradient at w + e_S, against the same sampled completions, advantages and old
log-probabilities (on-policy, where TRL records none and its loss would take the pass's own, the log-probabilities at
w, computed once per SAM micro-batch without gradient). `RLOOTrainer` is refused (see `LWSAMMixin`).
"""

from __future__ import annotations

try:
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
except ImportError as e:  # an optional extra
    raise ImportError('hf_lwsam.trl needs TRL: pip install "trl>=1.16" (or, in a clone of hf_lwsam, '
                      'pip install -e ".[trl]").') from e

from .config import lwsam_config
from .trainer import lwsam_trainer

SFTLWSAMConfig = lwsam_config(SFTConfig)
SFTLWSAMTrainer = lwsam_trainer(SFTTrainer)
DPOLWSAMConfig = lwsam_config(DPOConfig)
DPOLWSAMTrainer = lwsam_trainer(DPOTrainer)
GRPOLWSAMConfig = lwsam_config(GRPOConfig)
GRPOLWSAMTrainer = lwsam_trainer(GRPOTrainer)
for _cls in (SFTLWSAMConfig, SFTLWSAMTrainer, DPOLWSAMConfig, DPOLWSAMTrainer, GRPOLWSAMConfig, GRPOLWSAMTrainer):
    _cls.__module__ = __name__  # importable as hf_lwsam.trl.X, so pickled configs (training_args.bin) load anywhere

__all__ = ["DPOLWSAMConfig", "DPOLWSAMTrainer", "GRPOLWSAMConfig", "GRPOLWSAMTrainer", "SFTLWSAMConfig",
           "SFTLWSAMTrainer"]
