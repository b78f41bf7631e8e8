"""OLoRA (Büyükakyüz 2024, arXiv:2406.01775): orthonormal B from a QR decomposition of W."""

from __future__ import annotations

import torch
from torch import Tensor

from . import InitConfig, LayerInit, register_init


class OloraConfig(InitConfig):
    pass


@register_init("olora")
class Olora:
    """W = QR; B = Q[:, :r] (orthonormal columns), A = R[:r], W ← W − s·B·A (Sec. 3; as peft's olora_init,
    which also leaves s in the residual rather than dividing it out of A)."""

    config = OloraConfig
    needs = "none"
    summary = "OLoRA (Büyükakyüz 2024): B, A from the QR decomposition of W (first r columns / rows); W ← W − s·B·A"
    changes_base = True
    default_lr = 3e-4  # benchmarks/init_zoo.py: of the rates run on both tasks, the one whose worse task is closest to its best (SST-2 0.975 of best, GSM8K 1.000)

    def candidates(self, stats, weight: Tensor, cfg: OloraConfig, cap: int) -> Tensor:
        return torch.zeros(0)

    def init(self, stats, weight: Tensor, rank: int, cfg: OloraConfig, name: str = "", scale: float = 1.0) -> LayerInit:
        q, r = torch.linalg.qr(weight.float())  # float32 as peft (float64 cost 1.5× for nothing an fp32 W holds)
        return LayerInit(r[:rank].to(weight.dtype), q[:, :rank].to(weight.dtype), residual=True)
