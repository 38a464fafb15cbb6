"""`LWSAMConfig` validation and the trainer's construction-time checks: clear `ValueError`s, never `assert`."""

from __future__ import annotations

import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMConfig, LWSAMTrainer


def _config(tmp_path, **kwargs) -> LWSAMConfig:
    return LWSAMConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sam_rho=-0.1), r"sam_rho=-0.1 is invalid: the perturbation radius must be >= 0"),
        (dict(sam_rho=float("nan")), r"sam_rho=nan is invalid"),
        (dict(sam_selection="everything"), r"sam_selection='everything' is unknown: use one of 'pattern', 'all'"),
        (dict(sam_selection="probe", sam_top_k=0), r"sam_top_k=0 is invalid: .* integer >= 1"),
        (dict(sam_selection="probe", sam_top_ratio=1.5), r"sam_top_ratio=1.5 is invalid: .* in \(0, 1\]"),
        (dict(sam_selection="probe", sam_top_ratio=0.0), r"sam_top_ratio=0.0 is invalid"),
        (dict(sam_selection="probe", sam_probe_metric="hessian"),
         r"sam_probe_metric='hessian' is unknown: use one of 'grad_norm', 'grad_norm_per_param', 'grad_norm_per_cost'"),
        (dict(sam_selection="probe", sam_probe_granularity="module"),
         r"sam_probe_granularity='module' is unknown: use one of 'block', 'layer'"),
        (dict(sam_selection="probe", sam_probe_interval=-1), r"sam_probe_interval=-1 is invalid"),
        (dict(sam_selection="probe", sam_probe_batches=0), r"sam_probe_batches=0 is invalid"),
        (dict(sam_selection="probe", sam_probe_batches=8, gradient_accumulation_steps=2, sam_probe_interval=2),
         r"sam_probe_interval=2 is shorter than one probe.*Set sam_probe_interval >= 4"),
        (dict(sam_target_layers=[]), r"sam_target_layers=\[\] is invalid: pass a regex string or a non-empty list"),
        (dict(sam_exclude_layers=[3]), r"sam_exclude_layers=\[3\] is invalid"),
        (dict(sam_target_layers="["), r"sam_target_layers='\[' is not a valid regular expression"),
        (dict(sam_exclude_layers="(a"), r"sam_exclude_layers='\(a' is not a valid regular expression"),
        (dict(fsdp="full_shard", fsdp_config={"version": 1}),
         r"fsdp='full_shard' with FSDP version 1 is not supported.* fsdp_config=\{'version': 2\}"),
        (dict(deepspeed={"zero_optimization": {"stage": 2}}),
         r"DeepSpeed ZeRO stage 2 .* Set zero_optimization.stage to 0 or 1"),
        (dict(deepspeed=json.dumps({"zero_optimization": {"stage": 3}})), r"DeepSpeed ZeRO stage 3"),
        (dict(optim="lomo"), r"optim='lomo' is not supported by LWSAMTrainer.* optim='adamw_torch'"),
        (dict(optim="galore_adamw_layerwise"), r"optim='galore_adamw_layerwise' is not supported"),
        (dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}),
         r"'use_reentrant': True\} is not supported.*'use_reentrant': False"),
        (dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
         r"'use_reentrant': True\} is not supported"),
    ],
)
def test_bad_config_raises_value_error(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **kwargs)


def test_deepspeed_zero_stage_from_a_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="DeepSpeed ZeRO stage 2"):
        _config(tmp_path, deepspeed=str(path))


@pytest.mark.parametrize(
    "deepspeed, message",
    [
        ('file:{"zero_optimization": {"stage": 1},', r"deepspeed='.*ds\.json' is not a valid JSON file \(.* line 1"),
        ("file:[1, 2]", r"deepspeed='.*ds\.json' holds a list, not a JSON object"),
        ({"zero_optimization": 2}, r"zero_optimization is 2 \(int\), not a mapping: write it as"),
        ('{"zero_optimization": [1]}', r"zero_optimization is \[1\] \(list\), not a mapping"),
        ({"zero_optimization": {"stage": "two"}}, r"zero_optimization.stage is 'two': use an integer 0-3"),
        ("no_such_ds_config.json", r"deepspeed='no_such_ds_config.json' is neither an existing file nor a JSON "),
    ],
)
def test_unreadable_deepspeed_config_is_one_value_error(tmp_path, deepspeed, message):
    """A DeepSpeed config that cannot be read, or whose `zero_optimization` is not a mapping, is one `ValueError`
    naming `deepspeed` and the fix (not a JSON or attribute error from inside the check)."""
    if isinstance(deepspeed, str) and deepspeed.startswith("file:"):
        path = tmp_path / "ds.json"
        path.write_text(deepspeed[len("file:"):])
        deepspeed = str(path)
    with pytest.raises(ValueError, match=message) as info:
        _config(tmp_path, deepspeed=deepspeed)
    text = str(info.value)
    assert type(info.value) is ValueError and "\n" not in text and "deepspeed" in text
    assert " pass " in text or " use " in text or "write it as" in text


def test_defaults_and_non_reentrant_checkpointing_are_accepted(tmp_path):
    config = _config(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    assert (config.sam_rho, config.sam_selection, config.sam_adaptive) == (0.05, "pattern", False)
    assert config.sam_target_layers is None and config.sam_exclude_layers is None


def test_hf_argument_parser_exposes_sam_flags():
    (config,) = HfArgumentParser(LWSAMConfig).parse_args_into_dataclasses(
        ["--output_dir", "o", "--sam_rho", "0.1", "--sam_selection", "probe", "--sam_adaptive",
         "--sam_target_layers", "h.4", "h.5", "--sam_exclude_layers", r".*ln_.*", "--report_to", "none"]
    )
    assert config.sam_rho == 0.1 and config.sam_selection == "probe" and config.sam_adaptive
    assert config.sam_target_layers == ["h.4", "h.5"]  # several values: names
    assert config.sam_exclude_layers == r".*ln_.*"  # one value: a regex, as in TRL
    help_text = HfArgumentParser(LWSAMConfig).format_help()
    assert "--sam_rho" in help_text and "perturbation radius" in help_text


def test_plain_training_arguments_are_converted(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, report_to="none", use_cpu=True)
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=args, train_dataset=shakespeare_lm_dataset(4))
    assert isinstance(trainer.args, LWSAMConfig)
    assert trainer.args.learning_rate == 3e-4 and trainer.args.sam_rho == 0.05
    assert trainer.perturbed_parameter_names()[0] == "transformer.h.2.ln_1.weight"


def test_trainer_rejects_unmatched_patterns_at_construction(tmp_path):
    args = _config(tmp_path / "never-created", sam_target_layers="blocks.9")
    with pytest.raises(ValueError, match=r"sam_target_layers='blocks.9' matches no module of GPT2LMHeadModel"):
        LWSAMTrainer(model=tiny_gpt2(), args=args)
    assert not (tmp_path / "never-created").exists()  # refused before the Trainer creates output_dir
