"""Config mistakes as lines that name the setting: ``MEMCUBE_*`` variables that set
nothing or hold no JSON where JSON is needed, where a bad value came from, and YAML
syntax errors. :mod:`proxy.settings` raises them as its ``ConfigError``."""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

PREFIX = "MEMCUBE_"


def _is_section(annotation: Any) -> bool:
    """A nested model (``upstream``, ``passthrough``): ``MEMCUBE_<SECTION>_<KEY>`` sets
    one of its keys. Lists (``models``) take JSON under their own name only."""
    kinds = (annotation, *get_args(annotation))
    return any(isinstance(k, type) and issubclass(k, BaseModel) for k in kinds)


def _env() -> dict[str, str]:
    """The ``MEMCUBE_*`` variables, names upper-cased (the settings read them in any case)."""
    return {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(PREFIX)}


def unknown_variables(fields: dict[str, Any]) -> list[str]:
    """A line for every ``MEMCUBE_*`` variable that names no setting (``fields``: the
    settings' fields by name, with their annotations). A misspelt variable would
    otherwise be ignored without a word."""
    sections = [name for name, ann in fields.items() if _is_section(ann)]
    lines = []
    for var in sorted(_env()):
        name = var[len(PREFIX):].lower()
        if name in fields or any(name.startswith(f"{s}_") for s in sections):
            continue
        lines.append(f"{var}: no such setting; unset it or fix its name ({PREFIX} then a "
                     f"setting, sections joined with one _: {PREFIX}DATA_DIR, "
                     f"{PREFIX}UPSTREAM_TIMEOUT)")
    return lines


def variable_of(loc: tuple[int | str, ...]) -> str | None:
    """The variable a validation error's value came from, if one is set: the whole field
    (``MEMCUBE_MODELS``) or a section's key (``MEMCUBE_UPSTREAM_TIMEOUT``)."""
    env = _env()
    names = [str(p).upper() for p in loc[:2]]
    for var in (PREFIX + "_".join(names), PREFIX + names[0]) if names else ():
        if var in env:
            return var
    return None


def settings_error(message: str, cause: BaseException | None) -> str:
    """pydantic-settings' error for a variable it could not parse (JSON, for lists and
    sections), as a line naming the variable."""
    found = re.search(r'field "([^"]+)"', message)
    var = PREFIX + found.group(1).upper() if found else f"a {PREFIX}* variable"
    why = f" ({cause})" if cause is not None else ""
    return (f"{var}: not valid JSON{why}; lists and sections in the environment take JSON, "
            f"e.g. {PREFIX}MODELS='[{{\"name\": \"x\", \"backend\": \"litellm\", "
            "\"model\": \"openai/x\"}]'")


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: where, and what."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return " ".join(str(exc).split())
    mark = exc.problem_mark
    line = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if exc.context and exc.context_mark is not None:
        at = exc.context_mark
        line += f" ({exc.context} from line {at.line + 1}, column {at.column + 1})"
    return line


def format_validation_error(exc: ValidationError, config: Path | None,
                            flags: Collection[str] = ()) -> str:
    """A line per invalid field, naming it and, when a variable set it, the variable
    (``flags``: fields the command line set, which no variable did)."""
    where = f"config {config}" if config else "settings"
    lines = [f"invalid {where}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        var = variable_of(err["loc"]) if err["loc"] and err["loc"][0] not in flags else None
        msg = "no such setting" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {field}: {msg}" + (f" (set by {var})" if var else ""))
    return "\n".join(lines)
