"""Registry of adapter initialization methods: one file per method, registered by name.

A method declares what it must observe (`needs`), may replace the base weight by a residual
(`LayerInit.residual`: W ← W − scale·B·A, applied by `adapt_` for every method alike), and owns a
pydantic config whose fields (with their descriptions) reach YAML, the CLI (`--init-opt key=value`) and
`rankwise config show --method NAME` without any other file knowing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import Field
from torch import Tensor, nn

from ..calib.stats import LayerStats
from ..config import StrictModel
from ..registry import import_all, lookup

# What a method must observe, from least to most: nothing; the top-k centred input spectrum
# (calibrate(keep=k)); the full second moments XᵀX and Σx (calibrate(keep="full")).
NEEDS = ("none", "spectrum", "moments")


class InitConfig(StrictModel):
    """Options every init method shares."""

    rank: int = Field(8, description="LoRA rank r; the budget is r × number of target layers")
    alpha: float | None = Field(None, description="LoRA alpha at rank r (null = r, i.e. scaling 1)")
    allocation: str = Field("uniform", description="rank allocation across layers: uniform or explained-variance")
    rslora: bool = Field(False, description="scale the adapter by alpha/√r instead of alpha/r (Kalajdzievski 2023)")


@dataclass
class LayerInit:
    """Initial adapter weights of one layer: A [r, in], B [out, r]; residual: the base becomes W − scale·B·A."""

    A: Tensor
    B: Tensor
    residual: bool = False
    note: str = ""  # recorded in the plan (e.g. "covariance dampened by 2% of its mean diagonal")
    base: nn.Module | None = None  # a re-made compressed base for the layer (LoftQ: codes of W − s·B·A)
    # A trained core between a frozen A and B (the adapter is s·B·R·A): [r, r] for a full core (LoRA-SB),
    # [r] for a diagonal one (SVFit). None: plain LoRA, A and B trained.
    core: Tensor | None = None


class InitMethod(Protocol):
    config: type[InitConfig]
    needs: Literal["none", "spectrum", "moments"]
    summary: str  # one line: paper, what it computes
    changes_base: bool
    default_lr: float
    # True: init() also takes original= (the float weight a compressed base was made from) and module= (the
    # compressed layer itself), for the methods that start from the compression error (loftq, compensation).
    needs_original: bool
    # True: the method starts from the weight gradient of the task loss (calibrate_gradients); init() then
    # also takes grad= (the mean-loss gradient [out, in] of that layer).
    needs_grad: bool
    # False: the method uses only the weight's shape and dtype (EVA, plain LoRA), so a model read block by block
    # (rankwise.lazy) is not read again for it. Taken as True when a method does not say.
    reads_weight: bool

    def candidates(self, stats: LayerStats | None, weight: Tensor, cfg: InitConfig, cap: int) -> Tensor:
        """Scores [m ≤ cap], descending, for the allocation to rank across layers."""

    def init(self, stats: LayerStats | None, weight: Tensor, rank: int, cfg: InitConfig, name: str = "",
             scale: float = 1.0) -> LayerInit:
        """Initial A and B for a layer given its rank; `scale` is what peft multiplies B·A by."""


INITS: dict[str, InitMethod] = {}


def register_init(name: str):
    """Class decorator: register an init method under `name`."""

    def wrap(cls):
        INITS[name] = cls()
        return cls

    return wrap


def get_init(name: str) -> InitMethod:
    import_all(__name__, __path__)
    return lookup(INITS, name, "method")


def all_methods() -> dict[str, InitMethod]:
    import_all(__name__, __path__)
    return dict(sorted(INITS.items()))


def config_options(name: str, **values) -> dict:
    """The subset of `values` that method `name`'s config accepts (shared CLI/run options → one method);
    None means "not given": the method's own default applies."""
    fields = get_init(name).config.model_fields
    return {k: v for k, v in values.items() if k in fields and v is not None}


def keep_for(methods: list[str], rank: int, rho: float = 1.0) -> str | int | None:
    """What one calibration must keep so that every method in `methods` can be planned from it:
    None (no calibration at all), k (top-k eigenpairs per module) or "full" (XᵀX, Σx)."""
    needs = {get_init(m).needs for m in methods}
    if "moments" in needs:
        return "full"
    if "spectrum" in needs:
        return max(1, round(rank * rho))
    return None


def grads_for(methods: list[str]) -> bool:
    """Whether one calibration must also collect weight gradients for these methods (once for all of them)."""
    return any(getattr(get_init(m), "needs_grad", False) for m in methods)


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    """What peft multiplies B·A by: alpha/r, or alpha/√r with rsLoRA."""
    return alpha / rank**0.5 if rslora else alpha / rank
