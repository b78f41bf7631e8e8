"""Decide only: plan(stats, model, method=…) → Plan (ranks, alphas, initial weights per layer)."""

from .plan import LayerPlan, Plan, plan

__all__ = ["LayerPlan", "Plan", "plan"]
