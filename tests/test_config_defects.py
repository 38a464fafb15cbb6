"""The config trains what the user asked for, however it is built: explicit options survive every construction path
(keywords, `dataclasses.replace`, the copy into TRL's configs, `HfArgumentParser`, `TrlParser`), presets are fully
defined and refuse what contradicts them, options that would do nothing are refused, and the optimizer, DeepSpeed and
FSDP setups that accelerate will really run (its launch environment included) are checked when the config is built."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest
import torch
from transformers import HfArgumentParser, Trainer

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMConfig, LWSAMTrainer
from hf_lwsam.ascent import first_moments
from hf_lwsam.config import SAM_DEFAULTS, SAM_PRESET_DEFAULTS, SAM_PRESETS, as_lwsam_config, sam_option_docs

RESOLVED = tuple(SAM_DEFAULTS)  # the options a preset or a mode can set


def _config(tmp_path, **kwargs) -> LWSAMConfig:
    return LWSAMConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def _sam(config) -> dict:
    return {name: getattr(config, name) for name in ("sam_preset", *RESOLVED)}


# ------------------------------------------------------------------ an explicit option survives every construction
def _by_keywords(tmp_path, **sam):
    return _config(tmp_path, **sam)


def _by_replace(tmp_path, **sam):
    return dataclasses.replace(_config(tmp_path, **sam), learning_rate=1e-4)


def _into_sft_config(tmp_path, **sam):
    from trl import SFTConfig

    return as_lwsam_config(_config(tmp_path, **sam), SFTConfig)  # what SFTLWSAMTrainer does with an LWSAMConfig


def _into_dpo_config(tmp_path, **sam):
    from trl import DPOConfig

    return as_lwsam_config(_config(tmp_path, **sam), DPOConfig)


def _flags(sam) -> list[str]:
    return [item for name, value in sam.items() for item in (f"--{name}", str(value))]


def _by_hf_argument_parser(tmp_path, **sam):
    (config,) = HfArgumentParser(LWSAMConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", *_flags(sam)])
    return config


def _by_trl_parser_and_config_file(tmp_path, **sam):
    from trl import TrlParser

    from hf_lwsam.trl import SFTLWSAMConfig

    path = tmp_path / "sft.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "bf16": False, "use_cpu": True, "report_to": "none",
                                **sam}))
    (config,) = TrlParser((SFTLWSAMConfig,)).parse_args_and_config(["--config", str(path)])
    return config


BUILDERS = [_by_keywords, _by_replace, _into_sft_config, _into_dpo_config, _by_hf_argument_parser,
            _by_trl_parser_and_config_file]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_a_radius_set_at_the_default_survives_every_construction(build, tmp_path):
    """`sam_rho=0.05` under `sam_preset='free'` (whose own radius is 0.2) is what the user set: every path keeps it."""
    config = build(tmp_path, sam_preset="free", sam_rho=0.05)
    assert (config.sam_rho, config.sam_selection, config.sam_ascent) == (0.05, "all", "momentum")
    assert build(tmp_path, sam_preset="free").sam_rho == 0.2


@pytest.mark.parametrize("build", [_by_hf_argument_parser, _by_trl_parser_and_config_file],
                         ids=lambda b: b.__name__)
@pytest.mark.parametrize("sam", [dict(sam_preset="free", sam_selection="pattern"),
                                 dict(sam_preset="fast", sam_start=0)])
def test_a_parser_refuses_an_option_that_contradicts_the_preset(build, sam, tmp_path):
    name = next(n for n in sam if n != "sam_preset")
    with pytest.raises(ValueError, match=rf"sam_preset='{sam['sam_preset']}' sets {name}=.* but {name}=.* was given"):
        build(tmp_path, **sam)


@pytest.mark.parametrize("preset", [None, *SAM_PRESETS])
def test_a_resolved_config_rebuilt_resolves_the_same_way(preset, tmp_path):
    """Idempotence: the resolved values a copy passes back in are the preset's own, so they are accepted and kept."""
    config = _config(tmp_path, sam_preset=preset)
    expected = {**SAM_DEFAULTS, **SAM_PRESETS.get(preset, {}), **SAM_PRESET_DEFAULTS.get(preset, {})}
    assert _sam(config) == {"sam_preset": preset, **expected}
    rebuilt = dataclasses.replace(config, learning_rate=1e-4)
    assert _sam(rebuilt) == _sam(config) == _sam(dataclasses.replace(rebuilt, seed=1))
    assert _sam(_into_sft_config(tmp_path, sam_preset=preset)) == _sam(config)


def test_the_documented_defaults_are_what_an_unset_option_becomes(tmp_path):
    """The options page, the docstring and the model card show the effective defaults, not the `None` that marks an
    unset option; the radius help names the free preset's own."""
    config, docs = _config(tmp_path), {o["name"]: o for o in sam_option_docs()}
    for name in RESOLVED:
        assert docs[name]["default"] == getattr(config, name) == SAM_DEFAULTS[name] is not None
        assert docs[name]["type"] in ("float", "str", "int")
    assert "sam_rho (`float`, *optional*, defaults to `0.05`)" in LWSAMConfig.__doc__
    assert "0.2 under sam_preset='free'" in docs["sam_rho"]["help"]
    assert _config(tmp_path, sam_preset="free").sam_rho == SAM_PRESET_DEFAULTS["free"]["sam_rho"] == 0.2


def test_a_replaced_free_config_trains_at_the_radius_the_user_set(sgd_args):
    """End to end: the rebuilt config perturbs with ||e_S|| = 0.05, the radius set, not the preset's 0.2."""
    args = dataclasses.replace(sgd_args(sam_preset="free", sam_rho=0.05, optim="adamw_torch", max_steps=3,
                                        gradient_accumulation_steps=1), learning_rate=1e-2)
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=args, train_dataset=shakespeare_lm_dataset(6))
    trainer.train()
    norms = [e["sam/e_norm"] for e in trainer.state.log_history if e.get("sam/e_norm")]
    assert len(norms) == 2 and all(n == pytest.approx(0.05, rel=1e-4) for n in norms)  # step 0 has no moment


# ------------------------------------------------------------------------- layer patterns under sam_selection='all'
@pytest.mark.parametrize("sam", [dict(sam_selection="all"), dict(sam_preset="exact"), dict(sam_preset="free")])
@pytest.mark.parametrize("target", ["transformer.h.1", ["transformer.h.1", "transformer.ln_f"]])
def test_target_layers_under_all_are_refused_with_the_fix(sam, target, tmp_path):
    with pytest.raises(ValueError, match=r"sam_target_layers=.* does nothing with sam_selection='all'.*use "
                                         r"sam_selection='pattern'"):
        _config(tmp_path, sam_target_layers=target, **sam)


def test_exclude_layers_under_all_are_accepted(tmp_path):
    config = _config(tmp_path, sam_preset="free", sam_exclude_layers="transformer.wte")
    assert (config.sam_selection, config.sam_exclude_layers) == ("all", "transformer.wte")
    assert _config(tmp_path, sam_selection="probe", sam_target_layers="transformer.h.1").sam_target_layers


# ----------------------------------------------------------------------------- presets refuse what contradicts them
@pytest.mark.parametrize("sam, name", [
    (dict(sam_preset="exact", sam_ascent="random"), "sam_ascent"),
    (dict(sam_preset="exact", sam_ascent="stale"), "sam_ascent"),
    (dict(sam_preset="exact", sam_interval=10), "sam_interval"),
    (dict(sam_preset="exact", sam_start=0.5), "sam_start"),
    (dict(sam_preset="fast", sam_interval=2), "sam_interval"),
    (dict(sam_preset="fast", sam_ascent="momentum"), "sam_ascent"),
    (dict(sam_preset="free", sam_selection="probe"), "sam_selection"),
    (dict(sam_preset="free", sam_ascent="exact"), "sam_ascent"),
])
def test_a_preset_refuses_an_option_against_its_definition(sam, name, tmp_path):
    with pytest.raises(ValueError, match=rf"sam_preset='{sam['sam_preset']}' sets {name}=.*, but {name}=.* was "
                                         r"given: drop one of the two"):
        _config(tmp_path, **sam)


def test_a_preset_accepts_its_own_values_given_again(tmp_path):
    config = _config(tmp_path, sam_preset="exact", sam_selection="all", sam_ascent="exact", sam_interval=1,
                     sam_start=0)
    assert _sam(config) == {"sam_preset": "exact", "sam_rho": 0.05, **SAM_PRESETS["exact"]}


@pytest.mark.parametrize("sam, message", [
    (dict(sam_preset="free"), r"with sam_selection='all' \(set by sam_preset='free'\): every layer is perturbed"),
    (dict(sam_preset="exact"), r"with sam_selection='all' \(set by sam_preset='exact'\)"),
    (dict(sam_selection="all"), r"with sam_selection='all': every layer is perturbed"),
    (dict(sam_ascent="stale"), r"with sam_ascent='stale': a one-pass ascent has no first pass to reuse"),
    (dict(sam_ascent="momentum"), r"with sam_ascent='momentum'"),
])
def test_reuse_off_where_nothing_is_reused_is_refused(sam, message, tmp_path):
    with pytest.raises(ValueError, match=r"sam_reuse_activations=False does nothing " + message):
        _config(tmp_path, sam_reuse_activations=False, **sam)
    assert _config(tmp_path, sam_reuse_activations=False).sam_reuse_activations is False  # pattern, exact: reused


def test_rho_zero_under_the_free_preset_trains_exactly_as_the_stock_trainer(sgd_args):
    """sam_rho=0 is documented as plain training: e_S = 0, so every step equals the stock AdamW step, bit for bit."""
    common = dict(optim="adamw_torch", learning_rate=1e-2, max_steps=3, gradient_accumulation_steps=1)
    plain, sam = tiny_gpt2(), tiny_gpt2()
    Trainer(model=plain, args=sgd_args(**common), train_dataset=shakespeare_lm_dataset(6)).train()
    trainer = LWSAMTrainer(model=sam, args=sgd_args(sam_preset="free", sam_rho=0.0, **common),
                           train_dataset=shakespeare_lm_dataset(6))
    trainer.train()
    assert [e["sam/sam_steps"] for e in trainer.state.log_history if "sam/sam_steps" in e] == [0.0, 1.0, 1.0]
    for (name, p), q in zip(plain.named_parameters(), sam.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------- the first moment of the optimizer
ADAM_FAMILY = [torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", ADAM_FAMILY, ids=lambda c: c.__name__)
def test_exp_avg_is_the_beta1_average_of_the_gradients(cls, foreach):
    """What `first_moments` reads is m_t = beta1 m_{t-1} + (1 - beta1) g_t, m_0 = 0, for every class it accepts."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    optimizer = cls([w], lr=1e-3, betas=(0.8, 0.99), foreach=foreach)
    g1, g2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for g in (g1, g2):
        w.grad = g.clone()
        optimizer.step()
    key, inner = first_moments(optimizer)
    assert key == "exp_avg" and inner is optimizer
    torch.testing.assert_close(optimizer.state[w][key], 0.8 * 0.2 * g1 + 0.2 * g2)


def test_momentum_buffer_is_sgd_momentum():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    g1, g2 = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for g in (g1, g2):
        w.grad = g.clone()
        optimizer.step()
    assert first_moments(optimizer)[0] == "momentum_buffer"
    torch.testing.assert_close(optimizer.state[w]["momentum_buffer"], 0.9 * g1 + g2)


class _LoggingAdamW(torch.optim.AdamW):
    """A subclass: its step could keep `exp_avg` differently, so it is not read."""


def _param() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2))]


@pytest.mark.parametrize("make, why", [
    *[(lambda cls=cls: cls(_param(), betas=(0.0, 0.999)), f"{cls.__module__}.{cls.__name__}: its beta1 is 0")
      for cls in ADAM_FAMILY],
    (lambda: torch.optim.AdamW([{"params": _param()}, {"params": _param(), "betas": (0.0, 0.9)}]), "its beta1 is 0"),
    (lambda: _LoggingAdamW(_param()), "_LoggingAdamW: it subclasses torch.optim.adamw.AdamW"),
    (lambda: torch.optim.AdamW(_param(), maximize=True), "maximize=True makes its exp_avg an average of the negated"),
    (lambda: torch.optim.SGD(_param(), lr=0.1), "torch.optim.sgd.SGD: SGD without momentum keeps none"),
    (lambda: torch.optim.SGD(_param(), lr=0.1, momentum=0.9, dampening=1.0), "dampening=1 keeps momentum_buffer"),
    (lambda: torch.optim.Adagrad(_param()), "torch.optim.adagrad.Adagrad: it keeps no first moment that can be read"),
    (lambda: torch.optim.RMSprop(_param(), momentum=0.9), "torch.optim.rmsprop.RMSprop: it keeps no first moment"),
])
def test_an_optimizer_without_a_usable_first_moment_is_refused_by_name(make, why):
    with pytest.raises(ValueError, match=r"sam_ascent='momentum' needs the optimizer's first moment, but the "
                                         r"optimizer is ") as info:
        first_moments(make())
    assert why in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_adam_beta1_zero_is_refused_when_the_config_is_built(optim, tmp_path):
    with pytest.raises(ValueError, match=rf"optim='{optim}' builds torch\.optim\.adamw\.AdamW with .*betas=\(0\.0, "
                                         r"0\.999\).*its beta1 is 0.*Set adam_beta1 \(betas\[0\]\) > 0"):
        _config(tmp_path, sam_ascent="momentum", optim=optim, adam_beta1=0.0)
    assert _config(tmp_path, sam_ascent="momentum", optim=optim, adam_beta1=0.5).adam_beta1 == 0.5


@pytest.mark.parametrize("optim, optim_args", [
    ("adafactor", None), ("adamw_torch_8bit", None), ("paged_adamw_8bit", None), ("lion_32bit", None),
    ("schedule_free_adamw", None), ("adamw_anyprecision", None), ("sgd", None), ("sgd", "momentum=0"),
    ("rmsprop", "momentum=0.9"), ("adagrad", None),
])
def test_an_optim_without_a_readable_moment_is_refused_with_the_fix(optim, optim_args, tmp_path):
    with pytest.raises(ValueError, match=rf"needs the optimizer's first moment, but optim='{optim}'.*Use "
                                         r"optim='adamw_torch'.* sam_preset='exact' or 'fast'"):
        _config(tmp_path, sam_ascent="momentum", optim=optim, optim_args=optim_args)


def test_sgd_with_momentum_in_optim_args_is_accepted_and_bad_optim_args_are_named(tmp_path):
    assert _config(tmp_path, sam_ascent="momentum", optim="sgd", optim_args="momentum=0.9").optim == "sgd"
    with pytest.raises(ValueError, match=r"optim_args='momentum0\.9' cannot be read .*'momentum=0\.9'"):
        _config(tmp_path, sam_ascent="momentum", optim="sgd", optim_args="momentum0.9")


def test_the_command_line_refuses_the_optimizer_before_touching_a_finished_run(tmp_path):
    """`--sam_preset free --sam_momentum optimizer --optim adafactor --overwrite_output_dir` on a finished run: exit
    2, one line, every file of the run left as it was."""
    from hf_lwsam.cli.train import main

    out = tmp_path / "finished"
    out.mkdir()
    (out / "all_results.json").write_text('{"train_loss": 1.0}')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--output_dir", str(out), "--sam_preset", "free", "--sam_momentum", "optimizer", "--optim",
                     "adafactor", "--overwrite_output_dir"])
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "optim='adafactor' keeps none that can be read" in lines[0], err.getvalue()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------- DeepSpeed and FSDP from the launch environment
@pytest.mark.parametrize("env, stage", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, 3),
    ({"ACCELERATE_USE_DEEPSPEED": "1", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, 2),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, 2),  # accelerate's default stage
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, 2),
])
def test_deepspeed_zero_from_accelerate_launch_is_refused(env, stage, tmp_path, monkeypatch):
    if "ACCELERATE_DEEPSPEED_CONFIG_FILE" in env:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1}))
        env = {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"DeepSpeed ZeRO stage {stage} \(ACCELERATE_USE_DEEPSPEED=true, .* from "
                                         r"accelerate launch\) is not supported by LWSAMTrainer.*zero_stage"):
        _config(tmp_path)


def test_momentum_under_deepspeed_from_accelerate_launch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(ValueError, match=r"sam_ascent='momentum' with DeepSpeed \(ACCELERATE_USE_DEEPSPEED=true, "
                                         r"ACCELERATE_DEEPSPEED_ZERO_STAGE=1 from accelerate launch\)"):
        _config(tmp_path, sam_preset="free")


@pytest.mark.parametrize("version", ["1", None])
def test_fsdp1_from_accelerate_launch_is_refused(version, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if version is None:
        monkeypatch.delenv("FSDP_VERSION", raising=False)  # accelerate's default: FSDP1
    else:
        monkeypatch.setenv("FSDP_VERSION", version)
    with pytest.raises(ValueError, match=r"FSDP version 1 \(ACCELERATE_USE_FSDP=true, FSDP_VERSION=.* from accelerate "
                                         r"launch\) is not supported.*Use FSDP2"):
        _config(tmp_path)


def test_fsdp2_from_accelerate_launch_is_sharding_for_every_check(tmp_path, monkeypatch):
    from hf_lwsam.config import fsdp_version

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_version(_config(tmp_path)) == 2
    with pytest.raises(ValueError, match=r"sam_ascent='random' is not supported with ACCELERATE_USE_FSDP=true"):
        _config(tmp_path, sam_ascent="random")
    with pytest.raises(ValueError, match=r"'looksam' is not supported with ACCELERATE_USE_FSDP=true"):
        _config(tmp_path, sam_interval=2, sam_interval_reuse="looksam")
    monkeypatch.setenv("FSDP_VERSION", "1")  # the options win over the environment, as in the Trainer
    assert fsdp_version(_config(tmp_path, fsdp="full_shard", fsdp_config={"version": 2})) == 2


@pytest.mark.parametrize("preset", [None, "exact", "free"])
def test_a_compute_loss_set_on_the_trainer_is_kept_for_the_whole_run(sgd_args, preset):
    """A loss set on the trainer instance (as users patch one in) is the loss of every step, as in the stock Trainer:
    at sam_rho=0 the weights are the stock Trainer's with the same loss, bit for bit, and it is still set after."""
    import types

    def tripled(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return 3.0 * type(self).compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    common = dict(optim="adamw_torch", learning_rate=1e-2, max_steps=4, gradient_accumulation_steps=2)
    plain, sam = tiny_gpt2(), tiny_gpt2()
    stock = Trainer(model=plain, args=sgd_args(**common), train_dataset=shakespeare_lm_dataset(16))
    stock.compute_loss = types.MethodType(tripled, stock)
    stock.train()
    trainer = LWSAMTrainer(model=sam, args=sgd_args(sam_preset=preset, sam_rho=0.0, **common),
                           train_dataset=shakespeare_lm_dataset(16))
    trainer.compute_loss = types.MethodType(tripled, trainer)
    trainer.train()
    assert vars(trainer)["compute_loss"].__func__ is tripled and "_prepare_inputs" not in vars(trainer)
    for (name, p), q in zip(plain.named_parameters(), sam.parameters()):
        assert torch.equal(p, q), name
