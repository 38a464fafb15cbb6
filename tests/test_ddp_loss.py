"""Two gloo processes report the losses of one process and take its step, on the same global batch: a sequence
classifier (whose loss ignores `num_items_in_batch`; the stock `Trainer` doubles its loss and gradient on two processes)
and a causal LM (token-averaged over the window and the processes), through `LWSAMTrainer` and `hf-lwsam-train`.

One `accelerate launch` of `tests/ddp_loss_worker.py` runs every scenario on two processes; the single-process runs
happen here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ddp_loss_worker import CLI_TASKS, TRAINER_RUNS, cli_argv, run_trainer
from test_cli import make_tiny_bert_dir, make_tiny_gpt2_dir, run_cli, write_play_texts, write_tweet_csvs
from test_distributed import CPU_CONFIG, ROOT, _free_port
from test_update_math import _rel

WORKER = Path(__file__).resolve().parent / "ddp_loss_worker.py"
TOLERANCE = 1e-4
LAUNCH_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo "
                       "is not available"),
    pytest.mark.slow,  # one launch of two processes, eight short runs: about a minute on 2 cores
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """The CLI runs' models and data files (`ddp_loss_worker.cli_argv`)."""
    root = tmp_path_factory.mktemp("ddp_loss_assets")
    dropout = ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop")
    for model_dir in (make_tiny_bert_dir(root / "tiny-bert"), make_tiny_gpt2_dir(root / "tiny-gpt2")):
        # dropout off: two processes draw other dropout masks than one, so their losses would differ by chance
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, **{k: 0.0 for k in dropout if k in config}}))
    write_tweet_csvs(root / "tweets")
    write_play_texts(root / "plays")
    return root


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> dict[str, list[dict]]:
    """Each two-process scenario's results on ranks 0 and 1."""
    out = tmp_path_factory.mktemp("ddp_loss")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
                           "--main_process_port", str(_free_port()), str(WORKER), "--out", str(out), "--cli_assets",
                           str(assets)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    names = [*TRAINER_RUNS, *(f"cli_{task}" for task in CLI_TASKS)]
    return {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(2)] for name in names}


@pytest.mark.parametrize("name", list(TRAINER_RUNS))
def test_trainer_losses_and_step_equal_one_process(runs, name, tmp_path):
    ranks = runs[name]
    assert [r["world_size"] for r in ranks] == [2, 2]
    single = run_trainer(name, str(tmp_path / "single"), world_size=1)
    for rank in ranks:
        assert rank["train_loss"] == pytest.approx(single["train_loss"], abs=TOLERANCE)
        assert rank["eval_loss"] == pytest.approx(single["eval_loss"], abs=TOLERANCE)
    # The same step: the weights after two SGD steps of SAM match the single process's.
    make = TRAINER_RUNS[name][0]
    start = {n: p.detach() for n, p in make().named_parameters()}
    assert _rel(ranks[0]["end"], single["end"], start) <= 1e-5
    assert all(torch.equal(ranks[0]["end"][n], ranks[1]["end"][n]) for n in start)
    # A classifier's loss is a per-batch mean: num_items_in_batch is not passed (a causal LM keeps it).
    assert ranks[0]["accepts_loss_kwargs"] is (name == "trainer_causal_lm")


@pytest.mark.parametrize("task", CLI_TASKS)
def test_cli_losses_equal_one_process(runs, assets, task, tmp_path):
    ranks = runs[f"cli_{task}"]
    code, _, err = run_cli(cli_argv(task, assets, str(tmp_path / "single"), world_size=1))
    assert code == 0, err[-3000:]
    single = json.loads((tmp_path / "single" / "all_results.json").read_text())
    for rank in ranks:
        assert rank["train_loss"] == pytest.approx(single["train_loss"], abs=TOLERANCE)
        assert rank["eval_loss"] == pytest.approx(single["eval_loss"], abs=TOLERANCE)

