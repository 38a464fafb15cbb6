"""The studies' methods as tables: a `Method` is one row (a name, its `sam_*` options, any other `TrainingArguments`
it changes, and how it gets its rho). `benchmark_accuracy.py` trains each row on each task; `benchmark_throughput.py`
times rows of the same type.

Adding a method is one row in a table (`main_methods`, `chat_methods`, `robust_methods`; `benchmark_throughput.py`'s
`methods`). The row's name is its cache key (`benchmarks/accuracy/runs/<task>__<name>__rho<rho>__seed<seed>.json`),
so a new name never reuses another row's runs. For example:

    # one-pass SAM from the optimizer's momentum, rho chosen on validation (seed 0) from its own grid
    Method("momentum SAM", dict(sam_selection="all", sam_ascent="momentum"), rhos=(0.05, 0.1, 0.3))
    # the same at a fixed rho: a one-value grid is no sweep
    Method("momentum SAM rho=0.3", dict(sam_selection="all", sam_ascent="momentum"), rhos=(0.3,))
    # AdamW with another learning-rate schedule: extra TrainingArguments, no SAM
    Method("adamw WSD", None, args=dict(lr_scheduler_type="warmup_stable_decay",
                                        lr_scheduler_kwargs=dict(num_decay_steps=16)))
    # a schedule over another row's layers and perturbation size: it takes that row's chosen rho
    Method("LW-SAM stale", dict(sam_selection="pattern", sam_ascent="stale"), rho_from="LW-SAM default")

The options and `args` go into each cached run's configuration (where its task records the method: the robustness
and chat tasks; and `args` everywhere), so a row whose options change is run again rather than read from the cache.

    >>> Method("adamw WSD", None, args=dict(lr_scheduler_type="warmup_stable_decay")).training_args(dict(seed=0))
    {'seed': 0, 'lr_scheduler_type': 'warmup_stable_decay'}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Method:
    """One row of a methods table.

    Args:
        name: the row's label in tables and its cache key.
        sam: its `sam_*` options (`LWSAMConfig`); `None`: plain training through the stock `Trainer` (AdamW).
        args: other `TrainingArguments` it sets on top of the task's (`lr_scheduler_type`, `lr_scheduler_kwargs`,
            ...), for plain and SAM rows alike.
        rhos: its own rho grid (chosen on validation, seed 0, when it has several values); `None`: the study's grid.
        rho_from: take this row's chosen rho instead of sweeping (a schedule over the same layers and e_S).
        cycle: `benchmark_throughput.py`: its timed steps are a multiple of this (whole `sam_interval` cycles, whole
            late-phase runs).
        lrs: a plain-baseline grid row's own learning rates (`baseline_grid`): each is run on the selection seeds
            and the best configuration of the grid is the task's reference.
        on_reference: a SAM row that trains with the reference's optimizer settings (`args`) and learning rate.
    """

    name: str
    sam: dict[str, Any] | None = None
    args: dict[str, Any] = field(default_factory=dict)
    rhos: tuple[float, ...] | None = None
    rho_from: str | None = None
    cycle: int = 1
    lrs: tuple[float, ...] | None = None
    on_reference: bool = False

    def __post_init__(self) -> None:
        misplaced = sorted(k for k in self.args if k.startswith("sam_"))
        if misplaced:
            raise ValueError(f"Method {self.name!r}: args={self.args!r} sets {', '.join(misplaced)}: put the sam_* "
                             "options in `sam` instead.")
        if self.sam is not None and any(not k.startswith("sam_") for k in self.sam):
            raise ValueError(f"Method {self.name!r}: sam={self.sam!r} holds options that are not sam_*: put them in "
                             "`args` instead.")
        if self.rhos is not None and self.rho_from is not None:
            raise ValueError(f"Method {self.name!r}: rhos={self.rhos!r} and rho_from={self.rho_from!r} both set: "
                             "give one of them.")
        if self.lrs is not None and self.sam is not None:
            raise ValueError(f"Method {self.name!r}: lrs={self.lrs!r} on a SAM row: a learning-rate grid belongs to a "
                             "plain baseline row (sam=None); a SAM row takes the reference's with on_reference=True.")
        if self.on_reference and self.sam is None:
            raise ValueError(f"Method {self.name!r}: on_reference=True on a plain row: the reference is itself a "
                             "plain row; give the row sam_* options or drop on_reference.")

    def training_args(self, task_args: dict[str, Any]) -> dict[str, Any]:
        """The task's `TrainingArguments` with this row's `args` on top."""
        return {**task_args, **self.args}

    def grid(self, rhos: list[float]) -> list[float]:
        """The rhos this row is swept over: its own `rhos`, else the study's `rhos`."""
        return list(self.rhos) if self.rhos is not None else list(rhos)


EMBEDDINGS = r".*(embeddings|wte|wpe)"  # BERT's embedding block, GPT-2's token and position embeddings
FULL, PATTERN = dict(sam_selection="all"), dict(sam_selection="pattern")


def main_methods(asam: bool = False, asam_rhos: list[float] | None = None, probe_no_embeddings: bool = False,
                 schedules: bool = False, probe_modes: bool = False) -> list[Method]:
    """The main suite's rows (cls, lm): AdamW, full SAM, the layer-wise default and the probe; the flags add rows."""
    probe = dict(sam_selection="probe", sam_top_k=2, sam_probe_interval=25)
    out = [Method("adamw"), Method("full SAM", dict(FULL)), Method("LW-SAM default", dict(PATTERN)),
           Method("LW-SAM probe k=2", dict(probe, sam_probe_granularity="layer"))]
    if asam:  # ASAM scales e by |w|, so it needs a larger rho: its own grid
        grid = tuple(asam_rhos or (0.1, 0.5, 1.0))
        out += [Method("full ASAM", dict(FULL, sam_adaptive=True), rhos=grid),
                Method("LW-ASAM default", dict(PATTERN, sam_adaptive=True), rhos=grid)]
    if probe_no_embeddings:  # the probe without the embeddings as candidates: their summed gradients rank them high
        out.append(Method("LW-SAM probe k=2 no-emb", dict(probe, sam_exclude_layers=EMBEDDINGS,
                                                          sam_probe_granularity="layer")))
    if probe_modes:  # the probe's candidates at block granularity, ranked by gradient norm or per unit of cost
        out += [Method(f"LW-SAM probe k=2 block{'/cost' if metric.endswith('cost') else ''}",
                       dict(probe, sam_probe_granularity="block", sam_probe_metric=metric))
                for metric in ("grad_norm", "grad_norm_per_cost")]
    if schedules:  # the ascent schedules on the default pattern: a stale ascent (one pass), and SAM every 4th step
        out += [Method("LW-SAM stale", dict(PATTERN, sam_ascent="stale")),
                Method("LW-SAM interval=4", dict(PATTERN, sam_interval=4))]
    return out


def chat_methods() -> list[Method]:
    """The SmolLM2 chat study's rows: AdamW (its learning rate and weight decay chosen on validation, `Task.lr_grid`),
    Adafactor (its own learning rate, chosen the same way), full SAM (`sam_preset="exact"`), `sam_preset="fast"`
    (full SAM over the last 20% of the run, at full SAM's rho), `sam_preset="free"` (the momentum ascent on every
    parameter), and the layer-wise default; full SAM's and the free preset's rho chosen on validation (seed 0)."""
    return [Method("adamw"), Method("adafactor", None, args=dict(optim="adafactor"), lrs=(1e-3, 2e-3, 4e-3)),
            Method("full SAM", dict(sam_preset="exact"), rhos=(0.01, 0.05, 0.1)),
            Method("fast preset", dict(sam_preset="fast"), rho_from="full SAM"),
            Method("free preset", dict(sam_preset="free"), rhos=(0.05, 0.1, 0.2, 0.5)),
            Method("LW-SAM default", dict(PATTERN), rhos=(0.05,))]


# The probe mode the robustness suite runs: the options spelled out, so that the cache notices a changed default.
PROBE = dict(sam_selection="probe", sam_top_k=2, sam_probe_interval=25, sam_probe_granularity="block",
             sam_probe_metric="grad_norm_per_cost")

# How deep must the perturbation reach? The output half of the trunk (ViT: blocks 2-3 of 4; MiniLM: 3-5 of 6) + head.
LAST_HALF = {"digits": r"vit\.layers\.[23]|vit\.layernorm|classifier",
             "tweets": r"bert\.encoder\.layer\.[345]|bert\.pooler\.dense|classifier"}

# Where does full SAM's gain come from? SAM over one part of the model at a time, as sam_target_layers.
LOCATIONS = {
    "digits": {"embeddings": r"vit\.embeddings", "input half": r"vit\.layers\.[01]",
               "output half": r"vit\.layers\.[23]", "norms": r".*layernorm.*",
               "attention": r"vit\.layers\.\d+\.attention", "mlp": r"vit\.layers\.\d+\.mlp", "head": r"classifier"},
    "tweets": {"embeddings": r"bert\.embeddings", "input half": r"bert\.encoder\.layer\.[012]",
               "output half": r"bert\.encoder\.layer\.[345]", "norms": r".*LayerNorm",
               "attention": r"bert\.encoder\.layer\.\d+\.attention",
               "mlp": r"bert\.encoder\.layer\.\d+\.(intermediate|output)", "head": r"bert\.pooler\.dense|classifier"},
}


def robust_methods(family: str) -> list[Method]:
    """The robustness suite's rows for the `digits` or `tweets` models; a schedule over another row's layers and e_S
    takes that row's chosen rho (`rho_from`)."""
    norms = dict(PATTERN, sam_target_layers=LOCATIONS[family]["norms"])
    return [Method("adamw"), Method("full SAM", dict(FULL)),
            Method("LW-SAM default", dict(PATTERN)), Method("LW-SAM probe", dict(PROBE)),
            Method("LW-SAM stale", dict(PATTERN, sam_ascent="stale"), rho_from="LW-SAM default"),
            Method("LW-SAM interval=4", dict(PATTERN, sam_interval=4), rho_from="LW-SAM default"),
            Method("LW-SAM last half", dict(PATTERN, sam_target_layers=LAST_HALF[family])),
            *[Method(f"SAM on {where}", dict(PATTERN, sam_target_layers=regex))
              for where, regex in LOCATIONS[family].items()],
            # The cheap modes: on every parameter, and on the normalization layers (SAM-ON's selection).
            Method("full LookSAM k=5", dict(FULL, sam_interval=5, sam_interval_reuse="looksam"), rho_from="full SAM"),
            *[Method(f"full SAM late {start:.0%}", dict(FULL, sam_start=start), rho_from="full SAM")
              for start in (0.7, 0.8, 0.9, 0.95)],  # SAM over the last 30% / 20% / 10% / 5% of the run
            Method("full random", dict(FULL, sam_ascent="random")),
            Method("norms stale", dict(norms, sam_ascent="stale"), rho_from="SAM on norms"),
            Method("norms late 70%", dict(norms, sam_start=0.7), rho_from="SAM on norms"),
            Method("norms LookSAM k=5", dict(norms, sam_interval=5, sam_interval_reuse="looksam"),
                   rho_from="SAM on norms"),
            *momentum_methods(family)]


# Momentum-SAM's radius is far larger than SAM's in its paper (rho = 3): its own grid, chosen on validation.
MOMENTUM_RHOS = (0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 3.0)
MOMENTUM = dict(sam_ascent="momentum")
# The digits tasks' run: 997 training images, batch 32, 30 epochs = 960 optimizer steps; a SAM tail over the last
# 20% (sam_start=0.8) owns the whole learning-rate decay of warmup_stable_decay (its last 192 steps).
DIGITS_STEPS = 960
WSD = dict(lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs=dict(num_decay_steps=DIGITS_STEPS // 5))


def momentum_methods(family: str) -> list[Method]:
    """The one-pass momentum ascent (`sam_ascent="momentum"`) on every parameter and on the layer-wise default, on
    the last 20% of the run, with its own gradient average (beside AdamW's moment, and with Adafactor beside Adafactor
    alone), and the late phases aligned to a fresh learning-rate decay (digits only: the decay is
    sized in its steps), beside AdamW on the same schedule."""
    rows = [Method("full momentum", dict(FULL, **MOMENTUM), rhos=MOMENTUM_RHOS),
            Method("LW-SAM momentum", dict(PATTERN, **MOMENTUM), rhos=MOMENTUM_RHOS),
            Method("full momentum late 80%", dict(FULL, **MOMENTUM, sam_start=0.8), rho_from="full momentum")]
    # The momentum ascent's own gradient average (`sam_momentum="own"`): with AdamW (beta 0.9 = adam_beta1) it is
    # expected to equal the optimizer's moment; with Adafactor, which keeps no first moment, against Adafactor alone.
    adafactor = dict(optim="adafactor")
    rows += [Method("full momentum own", dict(FULL, **MOMENTUM, sam_momentum="own"), rho_from="full momentum"),
             Method("adafactor", None, args=adafactor),
             Method("full momentum own adafactor", dict(FULL, **MOMENTUM, sam_momentum="own"), args=adafactor,
                    rhos=MOMENTUM_RHOS)]
    if family == "digits":
        rows += [Method("adamw WSD", None, args=WSD),
                 Method("full SAM late 80% WSD", dict(FULL, sam_start=0.8), args=WSD, rho_from="full SAM"),
                 Method("full momentum late 80% WSD", dict(FULL, **MOMENTUM, sam_start=0.8), args=WSD,
                        rho_from="full momentum")]
    return rows


# The plain-baseline grid (`baseline_grid`): each optimizer as `TrainingArguments`, with its own learning rates per task
# family (the digits ViT trains from scratch, the tweets tasks fine-tune the pretrained MiniLM, whose AdamW rate the
# suite chose from {1e-4, 4e-4}). AdamW sets no `optim`: the same default as the `adamw` row (`adamw_torch_fused`).
PLAIN_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {},
    "adafactor": dict(optim="adafactor"),  # transformers' Adafactor, fixed lr, no beta1
    "sgd": dict(optim="sgd", optim_args="momentum=0.9"),
}
PLAIN_LRS: dict[str, dict[str, tuple[float, ...]]] = {
    # digits: a fourth rate below the first grid, whose best (3e-4, both tasks) sat on its lower edge; SGD's lost 1e-1
    # (chance on every seed) for two below 1e-2, its best
    "digits": {"adamw": (1e-4, 3e-4, 1e-3, 3e-3), "adafactor": (1e-4, 3e-4, 1e-3, 3e-3),
               "sgd": (1e-3, 3e-3, 1e-2, 3e-2)},
    "tweets": {"adamw": (3e-5, 1e-4, 3e-4), "adafactor": (1e-4, 3e-4, 1e-3), "sgd": (3e-3, 1e-2, 3e-2)},
}
WEIGHT_DECAYS = (0.0, 0.1)
LABEL_SMOOTHINGS = (0.0, 0.1)


def baseline_grid(family: str = "digits") -> list[Method]:
    """The plain baselines a SAM mode is measured against on a task of `family` (`PLAIN_LRS`): every optimizer of
    `PLAIN_OPTIMIZERS` with its own learning-rate grid, times weight decay {0, 0.1} and label smoothing {0, 0.1} (48
    configurations on digits, 36 on the tweets tasks). The runner's `--baselines` runs each on the selection seeds and
    takes the best mean validation accuracy as the reference.

        >>> [sum(len(m.lrs) for m in baseline_grid(family)) for family in ("digits", "tweets")]
        [48, 36]
    """
    if family not in PLAIN_LRS:
        raise ValueError(f"no plain-baseline grid for the {family!r} tasks: add its learning rates to PLAIN_LRS "
                         f"(grids for {', '.join(PLAIN_LRS)}).")
    return [Method(f"plain {opt} wd{wd:g} ls{ls:g}", None, args=dict(args, weight_decay=wd, label_smoothing_factor=ls),
                   lrs=PLAIN_LRS[family][opt])
            for opt, args in PLAIN_OPTIMIZERS.items() for wd in WEIGHT_DECAYS for ls in LABEL_SMOOTHINGS]


# SAM's radius on the reference: grids reaching a decade below the radius validation chose on the first grids (their
# smallest: full SAM 0.01 of {0.01, ..., 0.2}, the free preset 0.03 of {0.03, ..., 3}), so a choice at an edge is seen.
REFERENCE_RHOS = {"full": (0.002, 0.005, 0.01, 0.02, 0.05, 0.1), "free": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)}


def reference_methods() -> list[Method]:
    """SAM on top of the task's reference (the best plain configuration): full SAM (`sam_preset="exact"`'s options),
    the fast preset (full SAM's rho) and the free preset, each radius from `REFERENCE_RHOS`."""
    return [Method("full SAM on reference", dict(FULL), rhos=REFERENCE_RHOS["full"], on_reference=True),
            Method("fast on reference", dict(sam_preset="fast"), rho_from="full SAM on reference", on_reference=True),
            Method("free on reference", dict(sam_preset="free"), rhos=REFERENCE_RHOS["free"], on_reference=True)]


def sam_refusal(sam: dict[str, Any], args: dict[str, Any]) -> str | None:
    """Why `LWSAMConfig` refuses the `sam_*` options `sam` with the `TrainingArguments` `args` (its `ValueError`'s
    message), `None` when it accepts them: the library decides, e.g. `sam_preset="free"` on Adafactor keeps its own
    gradient average, an explicit `sam_momentum="optimizer"` there is refused.

        >>> sam_refusal(dict(sam_preset="free"), dict(optim="adafactor")) is None
        True
        >>> "first moment" in sam_refusal(dict(sam_selection="all", sam_ascent="momentum", sam_momentum="optimizer"),
        ...                               dict(optim="adafactor"))
        True
    """
    import tempfile

    from hf_lwsam import LWSAMConfig

    with tempfile.TemporaryDirectory() as tmp:
        try:
            LWSAMConfig(output_dir=tmp, use_cpu=True, report_to="none", **args, **sam)
        except ValueError as e:
            return str(e)
    return None
