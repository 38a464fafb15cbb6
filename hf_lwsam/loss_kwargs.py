"""Whether a `Trainer` should hand `num_items_in_batch` to the model: only when the model's loss uses it.

transformers' `Trainer` sets `model_accepts_loss_kwargs` from the forward's signature alone (it takes `**kwargs`), and
with the flag on it treats the model's loss as summed and divided by `num_items_in_batch`, the token count of the
whole accumulation window on every process: it does not divide the loss by the gradient-accumulation steps and, under
`average_tokens_across_devices` (the default), multiplies it by the number of processes. Many models take `**kwargs`
only for attention options and return a per-batch mean (`BertForSequenceClassification`, every sequence-classification
head, masked-LM and seq2seq heads that call `CrossEntropyLoss()`): their reported loss and their gradient come out
multiplied by the accumulation steps times the number of processes. [`fix_loss_kwargs`] turns the flag off for them;
causal LMs, whose loss does use `num_items_in_batch`, keep the token average.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

from torch import nn
from transformers import Trainer
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import logging

logger = logging.get_logger(__name__)

NUM_ITEMS = "num_items_in_batch"


def forward_uses_num_items_in_batch(model: nn.Module) -> bool | None:
    """Whether `model`'s `forward` hands `num_items_in_batch` on to its loss: it names it, passes its `**kwargs` to
    `self.loss_function(...)` (transformers' token-normalised losses), or passes them on with the labels to a module
    that computes the loss. `None` when the source of `forward` cannot be read."""
    forward = inspect.unwrap(type(model).forward)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.arg == NUM_ITEMS or isinstance(node, ast.Name) and node.id == NUM_ITEMS:
            return True
        if isinstance(node, ast.Constant) and node.value == NUM_ITEMS:  # kwargs.get("num_items_in_batch")
            return True
        if isinstance(node, ast.Call) and any(k.arg is None for k in node.keywords):  # a call with **kwargs
            is_loss = isinstance(node.func, ast.Attribute) and node.func.attr == "loss_function"
            if is_loss or any(k.arg in (NUM_ITEMS, "labels") for k in node.keywords):
                return True
    return False


def _computes_own_loss(trainer: Trainer) -> bool:
    """The trainer (a subclass) computes or scales the loss itself: the stock loss path does not decide it."""
    mro = type(trainer).__mro__
    overridden = any("compute_loss" in vars(cls) for cls in mro[: mro.index(Trainer)])
    return (overridden or trainer.compute_loss_func is not None or trainer.label_smoother is not None
            or getattr(trainer, "loss_is_scaled_for_ga", None) is not None)


def fix_loss_kwargs(trainer: Trainer) -> bool:
    """Set `trainer.model_accepts_loss_kwargs = False` when the model takes `**kwargs` but its loss ignores
    `num_items_in_batch`, so that the stock `Trainer` averages its per-batch mean loss over accumulation steps and
    processes instead of multiplying it by their number. Call it after `Trainer.__init__`, before training.

    Left as the stock `Trainer` set it: a model whose loss uses `num_items_in_batch` (causal LMs: the loss stays a token
    average over the accumulation window and all processes), a model that declares `accepts_loss_kwargs`, a forward
    whose source cannot be read, and a trainer that computes or scales its own loss (`compute_loss` overridden, e.g.
    TRL's; `compute_loss_func`; label smoothing; `loss_is_scaled_for_ga` set).

    Returns:
        `bool`: whether the flag was turned off.
    """
    if not trainer.model_accepts_loss_kwargs or _computes_own_loss(trainer):
        return False
    # The module whose forward computes the loss: a model compiled before it was given to the trainer is the
    # compile wrapper, whose own forward(*args, **kwargs) says nothing about the loss.
    model: Any = unwrap_peft_model(trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False))
    if hasattr(model, "accepts_loss_kwargs") or forward_uses_num_items_in_batch(model) is not False:
        return False
    trainer.model_accepts_loss_kwargs = False
    logger.info(f"{type(model).__name__}'s loss ignores num_items_in_batch: it is not passed to the model, and the "
                "loss is averaged over accumulation steps and processes (model_accepts_loss_kwargs=False).")
    return True
