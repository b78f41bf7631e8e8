"""PELA-style recovery (Guo et al. 2024, "PELA: Learning Parameter-Efficient Models with Low-Rank
Approximation", Sec. 3.2–3.3): after SVD compression, train the low-rank factors with the one loop while
the original model, frozen, is the teacher.

Per scored token t (the tokens the language-model loss scores), with L layers' hidden states h:
    feature  = (1/L) Σ_l ‖h_s,l(t) − h_t,l(t)‖² / mean_t ‖h_t,l‖²   (feature distillation)
    kl       = KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) · τ²             (logit distillation)
and once per batch, for every factored layer, the weight-perturbation regularization
    reg      = mean over layers of ‖B·A − W₀‖²_F / ‖W₀‖²_F,
so that the factors drift from the original weights only as far as the distillation pays for.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import StrictModel
from ..data.sources import Dataset, batchify
from ..errors import ConfigError
from .linear import lowrank_layers


class RecoverConfig(StrictModel):
    """Weights of PELA's three losses (the optimization itself is a TrainConfig)."""

    feature: float = Field(1.0, ge=0, description="weight of the hidden-state distillation (every layer's output)")
    kl: float = Field(1.0, ge=0, description="weight of the logit KL to the teacher")
    reg: float = Field(0.01, ge=0, description="weight of the weight-perturbation regularization, the layers' mean ‖B·A − W₀‖²/‖W₀‖²")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term")
    check_examples: int = Field(16, ge=1, description="examples of the recovery data on which the distillation "
                                                      "loss is measured before and after (kept only if it fell)")


@dataclass
class RecoverResult:
    before: float  # distillation loss (feature + kl, as weighted) on the check examples, before
    after: float  # … after (= before when reverted)
    reverted: bool  # training raised it: the factors were put back as they were
    steps: int
    history: list[dict] = field(default_factory=list)


def _scored(batch: dict) -> Tensor:
    """[batch, seq−1] bool: positions whose next token the language-model loss scores."""
    return batch["labels"][:, 1:] != -100


class Distillation:
    """loss_fn for train(): PELA's losses of the student (the model passed in) against `teacher`."""

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: RecoverConfig):
        self.teacher, self.cfg = teacher.eval(), cfg
        self.refs = {n: teacher.get_submodule(n).weight.detach() for n in lowrank_layers(student)}
        self.norms = {n: float(w.pow(2).sum()) for n, w in self.refs.items()}

    def _outputs(self, model, batch, grad: bool):
        with torch.set_grad_enabled(grad):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)

    def distill(self, student, batch) -> tuple[Tensor, int]:
        """(summed feature + kl terms over the scored tokens, their count)."""
        device = next(student.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        cfg, mask = self.cfg, _scored(batch)
        t = self._outputs(self.teacher, batch, False)
        s = self._outputs(student, batch, torch.is_grad_enabled())
        n = int(mask.sum())
        total = s.logits.new_zeros(())
        if cfg.feature:
            hs, ht = s.hidden_states[1:], t.hidden_states[1:]
            feat = sum(((a[:, :-1][mask] - b[:, :-1][mask]).pow(2).sum(-1) / b[:, :-1][mask].pow(2).sum(-1).mean().clamp_min(1e-12)).sum()
                       for a, b in zip(hs, ht))
            total = total + cfg.feature * feat / len(hs)
        if cfg.kl:
            tau = cfg.temperature
            zs, zt = s.logits[:, :-1][mask].float() / tau, t.logits[:, :-1][mask].float() / tau
            kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="sum")
            total = total + cfg.kl * kl * tau**2
        return total, n

    def regularizer(self, student) -> Tensor:
        """Mean of ‖B·A − W₀‖²/‖W₀‖², each as ‖B·A‖² − 2⟨B·A, W₀⟩ + ‖W₀‖² = Σ(BᵀB ∘ AAᵀ) − 2Σ(BᵀW₀ ∘ A) + ‖W₀‖²,
        so that no out×in product (nor its gradient) is built: only k×k and k×in ones."""
        mods, total = lowrank_layers(student), 0.0
        for n, w in self.refs.items():
            a, b = mods[n].down.weight, mods[n].up.weight
            w = w.to(a.dtype)
            sq = ((b.T @ b) * (a @ a.T)).sum() - 2 * ((b.T @ w) * a).sum() + self.norms[n]
            total = total + sq.clamp_min(0) / self.norms[n]
        return total / len(self.refs)

    def __call__(self, student, batch) -> tuple[Tensor, int]:
        loss, n = self.distill(student, batch)
        if self.cfg.reg:  # a per-batch term: × n, since the loop divides by the scored count
            loss = loss + self.cfg.reg * self.regularizer(student) * n
        return loss, n


@torch.no_grad()
def distillation_loss(student, loss: Distillation, batches: list[dict]) -> float:
    """Mean feature + kl term per scored token over `batches` (no regularizer: the data's own loss)."""
    was = student.training
    student.eval()
    total, count = 0.0, 0
    for b in batches:
        v, n = loss.distill(student, b)
        total, count = total + float(v), count + n
    student.train(was)
    return total / max(count, 1)


def recover(student: nn.Module, teacher: nn.Module, data: Dataset, tokenizer, train_cfg, cfg: RecoverConfig | None = None,
            run_dir=None, resume: bool = False, progress: bool = True) -> RecoverResult:
    """Train `student`'s LowRankLinear factors (nothing else) on PELA's losses against `teacher`, in place.

    train_cfg: the loop's TrainConfig (steps, lr, batch size …); data: causal-LM records or packed text
    (the calibration data or the user's). The distillation loss is measured on the first
    cfg.check_examples examples before and after; if training raised it, the factors are put back.
    """
    from ..train.loop import train

    cfg = cfg or RecoverConfig()
    factored = lowrank_layers(student)
    if not factored:
        raise ConfigError("recover: the model has no low-rank factors (compress it with an SVD method first)")
    if data.task != "causal-lm":
        raise ConfigError(f"recover distils a causal language model; the data is {data.task}")
    if train_cfg.lr is None:
        raise ConfigError("recover: give the learning rate (train_cfg.lr); factors of a compressed model take ~1e-4")
    for p in student.parameters():
        p.requires_grad_(False)
    for m in factored.values():
        m.down.weight.requires_grad_(True)
        m.up.weight.requires_grad_(True)
    loss = Distillation(teacher, student, cfg)
    check = batchify(data.examples[: cfg.check_examples], tokenizer, train_cfg.batch_size)
    start = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    before = distillation_loss(student, loss, check)
    result = train(student, data, None, train_cfg, tokenizer, run_dir=run_dir, resume=resume, progress=progress,
                   loss_fn=loss)
    after = distillation_loss(student, loss, check)
    reverted = after > before
    if reverted:
        with torch.no_grad():
            for n, p in student.named_parameters():
                if n in start:
                    p.copy_(start[n])
        after = before
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    return RecoverResult(before, after, reverted, result.step, result.history)


def teacher_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the float model, to be the teacher after `model` is compressed in place."""
    t = copy.deepcopy(model).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t
