"""The update snapshot: ten configurations, covering every ascent, every selection and the schedule's options, train a
tiny model for 4 optimizer steps; the sha256 of every final weight and the logged `sam/*` values must equal the
fingerprints in `tests/data/update_snapshot.json`. A refactor of the step that changes no math keeps them bit for bit.

The fingerprints are those of one torch/transformers pair on one thread; under other versions the test is skipped
(bit patterns of float kernels are not stable across releases). Regenerate, after a change meant to alter the math,
with `python tests/test_update_snapshot.py --write` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))  # conftest's builders, also when run as a script
from conftest import shakespeare_lm_dataset, tiny_gpt2, tiny_llama_lora  # noqa: E402
from hf_lwsam import LWSAMConfig, LWSAMTrainer  # noqa: E402

SNAPSHOT = Path(__file__).parent / "data" / "update_snapshot.json"

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "all": {"sam_selection": "all"},
    "stale": {"sam_ascent": "stale"},
    "random": {"sam_ascent": "random"},
    "momentum": {"sam_ascent": "momentum", "optim": "adamw_torch", "learning_rate": 1e-2},
    "free": {"sam_preset": "free", "optim": "adamw_torch", "learning_rate": 1e-2},
    "looksam": {"sam_interval": 2, "sam_interval_reuse": "looksam"},
    "probe": {"sam_selection": "probe", "sam_top_k": 2},
    "adaptive_noreuse": {"sam_adaptive": True, "sam_reuse_activations": False},
    "lora_start": {"sam_start": 1, "sam_interval": 2, "model": "lora"},
}
BASE: dict[str, Any] = dict(
    per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, learning_rate=0.1, optim="sgd",
    lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
    train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
    disable_tqdm=True, seed=0,
)
_UNTIMED = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def fingerprint(name: str) -> dict[str, Any]:
    """Train configuration `name` on one thread: sha256 of the final weights (in `named_parameters` order) and the
    logged `sam/*` and `loss` values."""
    options = dict(CONFIGS[name])
    model = tiny_llama_lora() if options.pop("model", None) == "lora" else tiny_gpt2()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float reductions split over threads round differently
    try:
        with tempfile.TemporaryDirectory() as out:
            args = LWSAMConfig(**{**BASE, "output_dir": out, **options})
            trainer = LWSAMTrainer(model=model, args=args, train_dataset=shakespeare_lm_dataset(16))
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for _, p in model.named_parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    logs = [{k: v for k, v in entry.items() if k not in _UNTIMED} for entry in trainer.state.log_history]
    return {"weights": digest.hexdigest(), "logs": logs}


def _snapshot() -> dict[str, Any]:
    if not SNAPSHOT.exists():
        pytest.skip(f"{SNAPSHOT} is missing: write it with `python {__file__} --write`")
    saved = json.loads(SNAPSHOT.read_text())
    if saved["versions"] != _versions():
        pytest.skip(f"the snapshot was made with {saved['versions']}, this is {_versions()}: float kernels may round "
                    f"differently; rewrite it with `python {__file__} --write` on an unchanged step")
    return saved


@pytest.mark.parametrize("name", list(CONFIGS))
def test_update_is_bit_identical_to_the_snapshot(name):
    saved = _snapshot()["configs"][name]
    now = fingerprint(name)
    assert now["logs"] == saved["logs"]
    assert now["weights"] == saved["weights"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python {sys.argv[0]} --write")
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(json.dumps({"versions": _versions(), "configs": {n: fingerprint(n) for n in CONFIGS}},
                                   indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")
