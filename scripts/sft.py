"""`python scripts/sft.py ...` = `hf-lwsam-sft ...`: supervised fine-tuning with TRL's SFTTrainer and layer-wise SAM."""

import sys

from hf_lwsam.cli.sft import main

if __name__ == "__main__":
    sys.exit(main())
