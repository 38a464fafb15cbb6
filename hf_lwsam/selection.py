"""Which layers layer-wise SAM perturbs: PEFT-style name matching and the output-side default.

A *layer* is a module that directly owns trainable parameters (a `Linear`, a `LayerNorm`, a LoRA `lora_A`, ...).
Matching a larger module (a whole transformer block) selects every layer beneath it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

Pattern = Sequence[str] | str | None


def name_matches(name: str, pattern: Pattern) -> bool:
    """PEFT `target_modules` semantics: regex `fullmatch` for a string; exact or dotted suffix for a list."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def is_block_list(module: nn.Module) -> bool:
    """An `nn.ModuleList` of >= 2 modules of one class: a stack of repeated blocks."""
    return isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(block) for block in module}) == 1


def find_trunk(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The repeated-block trunk: the `nn.ModuleList` of same-class blocks holding the most parameters.

    GPT-2 `transformer.h`, Llama/Qwen/Mistral `model.layers`, BERT/RoBERTa `encoder.layer`, also under a PEFT wrapper.
    Returns `(name, module_list)` or `None` when the model has no such list.
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not is_block_list(module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    return best


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input embedding, or `None` for models without one (vision CNNs raise `NotImplementedError`)."""
    get_input = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get_input() if callable(get_input) else None
    except (NotImplementedError, AttributeError):
        return None
    return embedding if isinstance(embedding, nn.Module) else None


def _tied_to_input_embedding(model: nn.Module, module: nn.Module) -> bool:
    embedding = input_embedding(model)
    if embedding is None:
        return False
    embedding_ids = {id(p) for p in embedding.parameters()}
    return any(id(p) in embedding_ids for p in module.parameters(recurse=False))


ExecutionOrder = tuple[dict[str, int], int]


def trace_execution_order(model: nn.Module, run: Callable[[], Any]) -> ExecutionOrder:
    """When each module of `model` is first entered during `run()` (a forward of the model), and when the trunk's
    last block first returns: `({name: entry number}, entries before that return)`. A module entered at or after
    that number runs after the trunk."""
    entered: dict[str, int] = {}
    trunk_end = [-1]
    trunk = find_trunk(model)
    last_block = trunk[1][len(trunk[1]) - 1] if trunk is not None else None
    handles = []

    def on_enter(name: str) -> Callable:
        def hook(*_: Any) -> None:
            entered.setdefault(name, len(entered))

        return hook

    def on_last_block_exit(*_: Any) -> None:
        if trunk_end[0] < 0:
            trunk_end[0] = len(entered)

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(on_enter(name)))
        if last_block is not None:
            handles.append(last_block.register_forward_hook(on_last_block_exit))
        run()
    finally:
        for handle in handles:
            handle.remove()
    return entered, trunk_end[0]


def output_side_modules(model: nn.Module, order: ExecutionOrder | None = None) -> list[str]:
    """The default selection: the trunk's last block plus every module that runs after the trunk (final norm, task
    head), leaving out an output embedding tied to the input embedding.

    Without `order` (see `trace_execution_order`), "after the trunk" means registered after it; with it, first entered
    after the trunk's last block returned (modules never entered are left out), so modules registered after the
    trunk that run before it (BART's `layernorm_embedding`, DeBERTa-v2's `rel_embeddings`) are not perturbed.

    Raises `ValueError` when no trunk is found.
    """
    trunk = find_trunk(model)
    if trunk is None:
        raise ValueError(
            f"sam_target_layers=None needs a repeated-block trunk (an nn.ModuleList of transformer blocks) to pick "
            f"the output-side default, and {type(model).__name__} has none: pass sam_target_layers explicitly, e.g. "
            f"{_example_names(model)}."
        )
    trunk_name, blocks = trunk
    last_block = f"{trunk_name}.{len(blocks) - 1}"
    names = [last_block]
    seen_trunk = False
    for name, module in model.named_modules():
        if name == trunk_name:
            seen_trunk = True
        if not name or name == trunk_name or name.startswith(trunk_name + "."):
            continue
        after = seen_trunk if order is None else order[0].get(name, -1) >= order[1] >= 0
        if after and _owns_trainable(module) and not _tied_to_input_embedding(model, module):
            names.append(name)
    return names


def _example_names(model: nn.Module, limit: int = 8) -> str:
    layers = [name for name, module in model.named_modules() if name and _owns_trainable(module)]
    if len(layers) > limit:
        layers = layers[: limit // 2] + ["..."] + layers[-limit // 2 :]
    return "[" + ", ".join(layers) + "]"


def select_layers(
    model: nn.Module, target_layers: Pattern = None, exclude_layers: Pattern = None, order: ExecutionOrder | None = None
) -> list[str]:
    """The names of the layers (modules owning trainable parameters) that layer-wise SAM would perturb.

    A dry run of the selection before training.

    Args:
        model (`nn.Module`):
            The model, as given to the trainer (PEFT wrappers included).
        target_layers (`list[str]` or `str`, *optional*):
            PEFT `target_modules` semantics; `None` selects the output-side default (see `output_side_modules`).
        exclude_layers (`list[str]` or `str`, *optional*):
            Same semantics; removes every layer under a matched module.
        order (`tuple`, *optional*):
            `trace_execution_order(model, run)`: decide the default's "after the trunk" by execution order (the
            trainer traces its first batch); without it, by registration order.

    Raises:
        `ValueError`: when a pattern matches no module, or matches only frozen modules.
    """
    named = dict(model.named_modules())
    if target_layers is None:
        roots = output_side_modules(model, order)
    else:
        roots = [name for name in named if name and name_matches(name, target_layers)]
        if not roots:
            raise ValueError(
                f"sam_target_layers={target_layers!r} matches no module of {type(model).__name__}. Real layer names "
                f"look like {_example_names(model)}; a string is a regex matched with re.fullmatch against the whole "
                "name, a list matches exact names or dotted suffixes."
            )
    excluded = [name for name in named if name and name_matches(name, exclude_layers)]
    if exclude_layers is not None and not excluded:
        raise ValueError(
            f"sam_exclude_layers={exclude_layers!r} matches no module of {type(model).__name__}. Real layer names look "
            f"like {_example_names(model)}."
        )

    def under(name: str, prefixes: list[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    layers = [
        name
        for name, module in named.items()
        if under(name, roots) and not under(name, excluded) and _owns_trainable(module)
    ]
    if not layers:
        frozen = [name for name in named if under(name, roots) and not under(name, excluded)]
        what = "what is left after sam_exclude_layers" if excluded else "every module it matches"
        raise ValueError(
            f"sam_target_layers={target_layers!r} selects no trainable parameter: {what} is frozen "
            f"(e.g. {frozen[:4]}). Target modules with requires_grad=True parameters, e.g. "
            f"{_example_names(model)}."
        )
    return layers


def layer_parameters(model: nn.Module, layers: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """`(name, parameter)` of the trainable parameters owned directly by `layers`, named as in
    `model.named_parameters()` and each listed once (shared parameters under their first name)."""
    wanted = set(layers)
    owner_ids = set()
    for name, module in model.named_modules():
        if name in wanted:
            owner_ids.update(id(p) for p in module.parameters(recurse=False) if p.requires_grad)
    return [(name, p) for name, p in model.named_parameters() if id(p) in owner_ids]
