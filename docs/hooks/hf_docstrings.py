"""A griffe extension (mkdocs.yml: the python handler's `extensions`) that renders Hugging Face-style docstrings.

HF docstrings write cross-references as [`~transformers.Trainer`] (`~`: show the last name only) and optional
arguments as ``name (`float`, *optional*, defaults to `0.05`):``. griffe's Google parser reads the sections; then,
in every docstring of `PACKAGE` that is rendered:

- a cross-reference to a Hugging Face library becomes a link to its docs, `HF_DOCS/<library>/main/en/<page>#<name>`
  (`HF_PAGES` names the page; a name it lacks is a warning, which fails the strict build), and one to anything else
  becomes an autorefs link to our API page's anchor (`hf_lwsam.LWSAMConfig`; an unknown one fails the strict build);
- a parameter's type loses the HF markup and its default is the docstring's `defaults to` value, or the signature's
  default, or `None` (HF's convention for `*optional*` without one), so it no longer shows as "required";
- an entry that is not a parameter name (the closing "*other arguments*: as for [`~transformers.Trainer`].") leaves
  the table and follows it as a sentence.
"""

from __future__ import annotations

import logging
import re
from functools import cached_property
from typing import Any

from griffe import (
    Docstring,
    DocstringSection,
    DocstringSectionOtherParameters,
    DocstringSectionParameters,
    DocstringSectionText,
    Extension,
    Object,
    parse_docstring_annotation,
)

PACKAGE = "hf_lwsam"
HF_DOCS = "https://huggingface.co/docs"
# The page of each Hugging Face object our docstrings name; the anchor on it is the dotted name itself.
HF_PAGES = {
    "transformers.Trainer": "main_classes/trainer",
    "transformers.TrainingArguments": "main_classes/trainer",
    "transformers.Seq2SeqTrainer": "main_classes/trainer",
    "transformers.Seq2SeqTrainingArguments": "main_classes/trainer",
    "transformers.TrainerCallback": "main_classes/callback",
    "transformers.TrainerState": "main_classes/callback",
    "transformers.TrainerControl": "main_classes/callback",
    "transformers.PreTrainedModel": "main_classes/model",
    "transformers.HfArgumentParser": "internal/trainer_utils",
    "trl.SFTTrainer": "sft_trainer",
    "trl.SFTConfig": "sft_trainer",
    "trl.DPOTrainer": "dpo_trainer",
    "trl.DPOConfig": "dpo_trainer",
    "peft.LoraConfig": "package_reference/lora",
    "peft.PeftModel": "package_reference/peft_model",
    "accelerate.Accelerator": "package_reference/accelerator",
}
HF_LIBRARIES = {"transformers", "trl", "peft", "accelerate", "datasets", "evaluate", "huggingface_hub", "tokenizers"}
CROSS_REF = re.compile(r"\[`(~?)([A-Za-z_][\w.]*)`\]")
OPTIONAL = re.compile(r",\s*\*optional\*(?:,\s*defaults to\s+(.+))?$")
PARAMETER_NAME = re.compile(r"\*{0,2}[A-Za-z_]\w*")

_logger = logging.getLogger("mkdocs.plugins.hf_docstrings")  # a warning here fails `mkdocs build --strict`


def _target(name: str, scope: Object) -> str:
    """The autorefs identifier of one of our names: as written when it is dotted from the package, else the
    package's export of that name, else the name in the module of the documented object."""
    head = name.split(".")[0]
    if head == PACKAGE:
        return name
    for owner in (scope.package, scope.module):
        if head in owner.members:
            return f"{owner.path}.{name}"
    return name  # autorefs reports what it cannot find


def _links(text: str, scope: Object) -> str:
    """`text` with every HF cross-reference written as a Markdown link."""

    def link(match: re.Match) -> str:
        tilde, name = match.groups()
        shown = f"`{name.split('.')[-1] if tilde else name}`"
        library = name.split(".")[0]
        if library in HF_LIBRARIES:
            page = HF_PAGES.get(name)
            if page is None:
                _logger.warning(f"{scope.path}: no Hugging Face docs page for [`{tilde}{name}`]: "
                                f"add it to HF_PAGES in docs/hooks/hf_docstrings.py")
                return shown
            return f"[{shown}]({HF_DOCS}/{library}/main/en/{page}#{name})"
        return f"[{shown}][{_target(name, scope)}]"

    return CROSS_REF.sub(link, text)


def _plain_type(text: str) -> str:
    """An HF type without its markup: [`~transformers.TrainingArguments`] -> TrainingArguments, `float` -> float."""
    text = CROSS_REF.sub(lambda m: m.group(2).split(".")[-1] if m.group(1) else m.group(2), text)
    return text.replace("`", "").strip()


def _fix_parameters(section: DocstringSection, docstring: Docstring) -> list[DocstringSection]:
    """The section with HF types and defaults read, and the entries that are not parameters moved after it."""
    signature = getattr(docstring.parent, "parameters", None)
    kept, others = [], []
    for parameter in section.value:
        if not PARAMETER_NAME.fullmatch(parameter.name):
            others.append(f"{parameter.name.strip('*').capitalize()}: {parameter.description}")
            continue
        if isinstance(parameter.annotation, str):
            optional = OPTIONAL.search(parameter.annotation)
            kind = parameter.annotation[: optional.start()] if optional else parameter.annotation
            parameter.annotation = parse_docstring_annotation(_plain_type(kind), docstring) or None
            if optional and optional.group(1):
                parameter.value = optional.group(1).replace("`", "").strip()
            elif optional and parameter.value is None:
                in_signature = signature is not None and parameter.name in signature
                default = signature[parameter.name].default if in_signature else None
                parameter.value = default if default is not None else "None"
        kept.append(parameter)
    section.value = kept
    return [section, *(DocstringSectionText(text) for text in others)]


class HFDocstring(Docstring):
    """A docstring parsed by its configured parser (Google), then read as HF writes it."""

    @cached_property
    def parsed(self) -> list[DocstringSection]:
        sections: list[DocstringSection] = []
        for section in self.parse():
            if isinstance(section, (DocstringSectionParameters, DocstringSectionOtherParameters)):
                sections += _fix_parameters(section, self)
            else:
                sections.append(section)
        for section in sections:
            if isinstance(section.value, str):
                section.value = _links(section.value, self.parent)
            elif isinstance(section.value, list):
                for item in section.value:
                    if isinstance(getattr(item, "description", None), str):
                        item.description = _links(item.description, self.parent)
            elif isinstance(getattr(section.value, "description", None), str):  # an admonition
                section.value.description = _links(section.value.description, self.parent)
        return sections


class HFDocstrings(Extension):
    """Gives every object of `PACKAGE` an `HFDocstring`; nothing is parsed until a page renders it."""

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is None or obj.package.name != PACKAGE or isinstance(docstring, HFDocstring):
            return
        obj.docstring = HFDocstring(docstring.value, lineno=docstring.lineno, endlineno=docstring.endlineno,
                                    parent=obj, parser=docstring.parser, parser_options=docstring.parser_options)
