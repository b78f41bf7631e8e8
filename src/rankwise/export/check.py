"""Refuse to write a folder its loader would fill with random weights: the state of the model about to be
saved must be exactly what its architecture, built from the config, expects."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def unreloadable(model: nn.Module) -> tuple[list[str], list[str]]:
    """(missing, unexpected): the state keys the architecture built from `model.config` has and `model`
    lacks, and the reverse. Built on the meta device: no memory, no random init."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    expected, actual = set(fresh.state_dict()), set(model.state_dict())
    return sorted(expected - actual), sorted(actual - expected)


def check_reloadable(model: nn.Module, what: str) -> None:
    """ConfigError when `from_pretrained` of the folder about to be written would miss weights or find
    ones it does not know (a compressed layer, an adapter left in): plain transformers would initialise
    the missing ones at random and only print a load report."""
    missing, unexpected = unreloadable(model)
    if missing or unexpected:
        layers = sorted({k.rsplit(".", 1)[0] for k in missing + unexpected})
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in layers if _has(model, n)})
        raise ConfigError(
            f"{what}: {len(layers)} layer(s) such as {layers[0]} are not in a form from_pretrained reloads "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]}; module types {kinds}); nothing was written. "
            "This is a bug in rankwise's export: please report it")


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
