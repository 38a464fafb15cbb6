"""The one way a class joins a registry of named extensions (`sam_ascent`'s ascents, `sam_selection`'s rules)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound=type)


def register(registry: dict[str, T], cls: T, base: type, option: str, described: dict[str, str] | None = None) -> T:
    """Add `cls` to `registry` under `cls.name`, the value of `option` that selects it; a taken name is refused, never
    replaced (as PEFT's `register_peft_method` refuses one).

    Args:
        registry (`dict[str, type]`): the live registry the config validates `option` against.
        cls (`type`): the class to register.
        base (`type`): the class every entry subclasses.
        option (`str`): the config option whose value is the name, e.g. `"sam_ascent"`.
        described (`dict[str, str]`, *optional*): further class attributes that must be strings, with what each says.

    Raises:
        ValueError: `cls` is not a subclass of `base`, its `name` (or a `described` attribute) is not a non-empty
            string, or the name is taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{cls!r} cannot be registered as a {option} value: pass a subclass of "
                         f"hf_lwsam.{base.__name__}.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no name ({cls.__name__}.name={name!r}): set the class attribute "
                         f"name = '...', the {option} value that selects it.")
    for attribute, says in (described or {}).items():
        if not isinstance(getattr(cls, attribute, None), str):
            raise ValueError(f"{cls.__name__} has no {attribute}: set the class attribute {attribute} = '...' "
                             f"({says}).")
    if name in registry:
        taken = registry[name]
        raise ValueError(f"{option}={name!r} is already registered ({taken.__module__}.{taken.__qualname__}): give "
                         f"{cls.__name__} another name (taken: {', '.join(map(repr, registry))}).")
    registry[name] = cls
    return cls
