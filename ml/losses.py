"""Loss terms of reward-model training, as small pure functions of tensors.

Notation: r_c, r_r are the rewards of the chosen and rejected responses, shape [B]; Δ = r_c − r_r;
p ∈ [0, 1] is the (weak) probability that the chosen response is preferred; σ is the logistic
function. Every function returns a scalar (mean over the batch) unless its docstring gives another shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(delta: torch.Tensor, p: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Soft-label Bradley-Terry loss: mean of −[p·log σ(Δ − m) + (1 − p)·log σ(−Δ − m)].

    With p = 1 this is the usual −log σ(r_c − r_r − m). The margin m ≥ 0 makes the preferred side
    win by at least m reward units before its term flattens, in either direction. Shapes: delta [B], p [B] → scalar.
    """
    p = p.to(delta.dtype)
    return -(p * F.logsigmoid(delta - margin) + (1 - p) * F.logsigmoid(-delta - margin)).mean()


def hard_labels(p: torch.Tensor) -> torch.Tensor:
    """Turn soft preferences into hard ones: 1[p > 0.5] (a tie at 0.5 counts as rejected-preferred)."""
    return (p > 0.5).to(p.dtype)


def logconf_weight(step: int, total_steps: int, alpha: float, warmup_frac: float) -> float:
    """Weight of the confidence term at an optimizer step: α · min(1, step / (warmup_frac · total_steps)).

    The weight ramps linearly from 0 to α over the warm-up share of training and stays at α after.
    (The reference code of Burns et al. 2023 ramps towards warmup_frac instead and then jumps to α.)
    A warm-up fraction of 0 gives α from the first step.
    """
    warmup_steps = warmup_frac * total_steps
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / warmup_steps)


def logconf_loss(delta: torch.Tensor, p: torch.Tensor, weight: float, margin: float = 0.0) -> torch.Tensor:
    """Auxiliary confidence loss (Burns et al. 2023) for pairwise preferences.

    L = (1 − w)·BT(Δ; p) + w·BT(Δ; ŷ), where ŷ = 1[Δ > 0] is the student's own hardened prediction
    (detached) and BT is `bradley_terry_loss`. The student is pulled towards its own confident
    predictions as w grows, which lets it overrule weak labels it disagrees with.
    The hardening threshold is 0 (p = 0.5): pair order carries no class prior to balance against.
    """
    own = (delta.detach() > 0).to(delta.dtype)
    return (1 - weight) * bradley_terry_loss(delta, p, margin) + weight * bradley_terry_loss(delta, own, margin)


def centering_loss(r_c: torch.Tensor, r_r: torch.Tensor, coef: float) -> torch.Tensor:
    """Reward centering: coef · mean((r_c + r_r)²), which keeps the pair's mean reward near 0."""
    return coef * ((r_c + r_r) ** 2).mean()


def representation_distance(h: torch.Tensor, h0: torch.Tensor, kind: str = "relative_l2", eps: float = 1e-8) -> torch.Tensor:
    """Per-example drift d of pooled states h from the frozen model's h0, shape [B, H] → [B].

    relative_l2: ‖h − h₀‖² / ‖h₀‖². cosine: 1 − cos(h, h₀). Both are scale-free, so one λ means the
    same on every model family (a raw squared distance on MPNet's small pooled states nearly vanishes).
    """
    h = h.float()
    h0 = h0.float()
    if kind == "relative_l2":
        return ((h - h0) ** 2).sum(dim=-1) / ((h0**2).sum(dim=-1) + eps)
    if kind == "cosine":
        return 1 - F.cosine_similarity(h, h0, dim=-1, eps=eps)
    raise ValueError(f"unknown anchor distance {kind!r}; expected 'relative_l2' or 'cosine'")


def anchor_drift(pooled: list[torch.Tensor], pooled0: list[torch.Tensor], kind: str = "relative_l2") -> torch.Tensor:
    """Drift per example averaged over the anchored layers: d = (1/L) Σ_l d(h_l, h0_l), shape [B]."""
    distances = [representation_distance(h, h0, kind) for h, h0 in zip(pooled, pooled0, strict=True)]
    return torch.stack(distances, dim=0).mean(dim=0)


def anchor_penalty(drift: torch.Tensor, lam: float, tau: float = 0.0) -> torch.Tensor:
    """Representation Anchoring penalty: λ · mean(max(0, d − τ)) over examples.

    τ ≥ 0 is a drift tolerance: drift below it costs nothing, so the student keeps room for
    task-relevant adaptation. τ = 0 gives a plain penalty.
    """
    return lam * torch.clamp(drift - tau, min=0).mean()


def l2sp_penalty(params: list[torch.Tensor], params0: list[torch.Tensor], lam: float) -> torch.Tensor:
    """L2-SP baseline (Li et al. 2018): λ · Σ ‖θ − θ₀‖² over the pretrained weights being trained."""
    total = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, params0, strict=True))
    return lam * total
