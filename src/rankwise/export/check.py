"""Refuse to write a folder its loader would fill with random weights: the state of the model about to be
saved must be exactly what its architecture, built from the config, expects."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def unreloadable(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, reshaped): the state keys the architecture built from `model.config` has and
    `model` lacks, the reverse, and the keys both have with different shapes (a Conv1D weight written
    [out, in]). Built on the meta device: no memory, no random init."""
    with torch.device("meta"):
        fresh = type(model)(model.config)
    expected, actual = fresh.state_dict(), model.state_dict()
    reshaped = sorted(k for k in set(expected) & set(actual) if expected[k].shape != actual[k].shape)
    return sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected)), reshaped


def check_reloadable(model: nn.Module, what: str) -> None:
    """ConfigError when `from_pretrained` of the folder about to be written would miss weights, find ones it
    does not know (a compressed layer, an adapter left in) or find them in another shape: plain transformers
    would initialise the missing ones at random and only print a load report."""
    missing, unexpected, reshaped = unreloadable(model)
    if missing or unexpected or reshaped:
        layers = sorted({k.rsplit(".", 1)[0] for k in missing + unexpected + reshaped})
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in layers if _has(model, n)})
        raise ConfigError(
            f"{what}: {len(layers)} layer(s) such as {layers[0]} are not in a form from_pretrained reloads "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]}, other shape {reshaped[:2]}; module types "
            f"{kinds}); nothing was written. This is a bug in rankwise's export: please report it")


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
