"""A command's parameters built from an options model, so each option is declared once.

The model (pydantic, e.g. :class:`swavctl.eval.options.EvalOptions`) holds each option's type,
default, ``--help`` text (the field's description) and checks. A command adds only how each field
is spelled on the command line (:class:`Flag`: option names, metavar, argument or option), and
:func:`takes_options` gives the command function the matching Typer signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, get_args

import typer
from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Flag:
    """How one field of an options model is given on the command line.

    ``name``: the option (``--batch-size``); None makes the field the positional argument.
    ``unset_is_none``: the command line's default is None ("not given": the model's default
    applies, or the command fills it in), for fields whose model default is not None.
    ``as_text``: typed as text on the command line (the model parses it, e.g. a comma list).
    ``alias``: a shared ``Annotated`` alias of :mod:`swavctl.commands.common` to use as it is; its
    help text must be the field's description.
    """

    name: str | None = None
    metavar: str | None = None
    unset_is_none: bool = False
    as_text: bool = False
    alias: Any = None


def option_parameters(
    model: type[BaseModel], flags: Mapping[str, Flag], library_only: Sequence[str] = ()
) -> list[inspect.Parameter]:
    """Typer parameters for the fields in ``flags`` (in that order).

    Every field of ``model`` must be in ``flags`` or in ``library_only`` (fields that only the
    Python API sets), so a new field is not silently missing from the command line.
    """
    missing = set(model.model_fields) - set(flags) - set(library_only)
    if missing:
        raise TypeError(f"{model.__name__}: no command-line flag for {sorted(missing)}")
    parameters = []
    for name, flag in flags.items():
        field = model.model_fields[name]
        default = None if flag.unset_is_none or flag.as_text else field.default
        if flag.alias is not None:
            alias_help = next(a for a in get_args(flag.alias)[1:] if hasattr(a, "help")).help
            if alias_help != field.description:
                raise TypeError(f"{model.__name__}.{name}: the alias's help is not the field's description")
            annotation = flag.alias
        else:
            kind: Any = str if flag.as_text else field.annotation
            if default is None:
                kind = kind | None
            info = (
                typer.Argument(metavar=flag.metavar, help=field.description)
                if flag.name is None
                else typer.Option(flag.name, metavar=flag.metavar, help=field.description)
            )
            annotation = Annotated[kind, info]
        parameters.append(parameter(name, annotation, default))
    return parameters


def takes_options(
    model: type[BaseModel],
    flags: Mapping[str, Flag],
    *,
    library_only: Sequence[str] = (),
    extra: Sequence[inspect.Parameter] = (),
) -> Callable[[F], F]:
    """Give the decorated command (``def command(**given)``) the parameters of ``model``'s fields,
    then ``extra`` (command-line-only parameters such as ``--json``)."""

    def apply(command: F) -> F:
        parameters = [*option_parameters(model, flags, library_only), *extra]
        command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
        return command

    return apply


def given(values: Mapping[str, Any], flags: Mapping[str, Flag]) -> dict[str, Any]:
    """The command-line values for the model, without those left unset (the model's defaults apply)."""
    return {
        name: value
        for name, value in values.items()
        if name in flags and not (value is None and (flags[name].unset_is_none or flags[name].as_text))
    }


def parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """A command-line-only parameter for ``takes_options(extra=...)``."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
