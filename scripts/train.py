#!/usr/bin/env python
"""Fine-tune a model with layer-wise SAM: a thin wrapper around `hf_lwsam.cli.train` (also `hf-lwsam-train`).

    python scripts/train.py                   # the shipped MiniLM on the shipped tweets, offline
    python scripts/train.py --help            # every flag (TrainingArguments + sam_* + model/data options)
    accelerate launch scripts/train.py ...    # multi-GPU / multi-process
"""

import sys

from hf_lwsam.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
