"""Config base: pydantic models that reject unknown keys with a did-you-mean hint."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError


class StrictModel(BaseModel):
    """A config model: unknown keys are errors that name the key and the nearest valid one."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def build(cls, where: str = "config", **values: Any):
        try:
            return cls(**values)
        except ValidationError as e:
            raise ConfigError(_explain(cls, e, where)) from None


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the (nested) model that holds the key at `loc`."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


def _explain(cls: type[BaseModel], err: ValidationError, where: str) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(root)"
        if item["type"] == "extra_forbidden":
            valid = _fields_at(cls, item["loc"])
            near = difflib.get_close_matches(str(item["loc"][-1]), valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
            lines.append(f"{where}: unknown key {key!r}{hint}")
        elif item["type"] == "value_error":  # our own validators: the message says it all
            lines.append(f"{where}: {key}: {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{where}: {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)
