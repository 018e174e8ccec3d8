"""Reinforced Agent Merging (RAM) and its rescaled variant RAM+ (tensor-local), mergekit's
``ram`` and ``ramplus_tl``.

RL fine-tuning changes few parameters, and different agents change different ones; averaging
their task vectors would shrink each agent's own changes by 1/M. RAM sorts every entry of a
tensor by how many task vectors change it (|τ_i| > ``epsilon``):

- nobody: the base value is kept (changes of at most ``epsilon`` are dropped);
- one model (unique): that model's change is added as it is;
- several models (shared): the mean of the changes of the models that made one.

RAM+ multiplies model i's unique changes by λ_i = 1 + r · clip(ρ_i, 0, α), where
ρ_i = (#shared entries model i changes) / max(#unique entries model i changes, ε), counted
within the tensor (hence "tensor-local"; the paper counts over the whole model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._common import task_vectors
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

PAPER = "https://arxiv.org/abs/2601.13572"

EPSILON = Param("epsilon", 1e-5, low=0.0, tensor=True,
                help="a task-vector entry counts as changed when its magnitude is above this")
R = Param("r", 0.1, low=0.0, tensor=True, help="RAM+ rescaling strength of the unique changes")
ALPHA = Param("alpha", 0.2, low=0.0, tensor=True, help="RAM+ upper bound of the shared/unique ratio ρ")


def _split(base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The task vectors with unchanged entries zeroed, which entries each model changes, and
    how many models change each entry."""
    deltas = task_vectors(base, tensors)
    changed = deltas.abs() > epsilon
    deltas.mul_(changed)
    return deltas, changed, changed.sum(dim=0)


def _combine(base: torch.Tensor, deltas: torch.Tensor, count: torch.Tensor, unique_scale: torch.Tensor | None) -> torch.Tensor:
    """θ_pre + Σ_i (τ_i / count where several models change the entry, λ_i · τ_i where only
    model i does); entries a model leaves unchanged are already zero in its task vector."""
    import torch

    shared = count > 1
    divisor = count.clamp(min=1)
    for i in range(deltas.shape[0]):
        own = deltas[i] if unique_scale is None else deltas[i] * unique_scale[i]
        deltas[i] = torch.where(shared, deltas[i] / divisor, own)
    return deltas.sum(dim=0).add_(base)


def _unique_scales(changed: torch.Tensor, count: torch.Tensor, *, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """RAM+'s λ_i = 1 + r · clip(ρ_i, 0, α) per model (float32, shape (M,)), ρ_i counted within this tensor."""
    import torch

    flat = changed.reshape(changed.shape[0], -1)
    n_shared = (flat & (count > 1).reshape(1, -1)).sum(dim=1).to(torch.float32)
    n_unique = (flat & (count == 1).reshape(1, -1)).sum(dim=1).to(torch.float32)
    rho = n_shared / n_unique.clamp(min=epsilon)
    # With epsilon 0 and no unique entry the ratio is 0/0; λ_i then scales nothing, so any
    # finite value will do (mergekit gets NaN there, which spoils the whole tensor).
    rho = torch.where(n_unique.clamp(min=epsilon) > 0, rho, torch.zeros_like(rho))
    return rho.clamp(min=0.0, max=alpha).mul(r).add(1.0)


@merge_method(
    "ram",
    params=(EPSILON,),
    paper=PAPER,
    summary="keep each model's unique changes, average the changes several models share",
)
def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, epsilon: float = 1e-5, **_: object) -> torch.Tensor:
    if not tensors:
        return base.clone()
    deltas, _, count = _split(base, tensors, float(epsilon))
    return _combine(base, deltas, count, None)


@merge_method(
    "ramplus_tl",
    params=(R, ALPHA, EPSILON),
    paper=PAPER,
    summary="RAM with each model's unique changes scaled up by 1 + r·clip(shared/unique, 0, α), counted per tensor",
)
def ramplus_tl(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5,
               **_: object) -> torch.Tensor:
    if not tensors:
        return base.clone()
    deltas, changed, count = _split(base, tensors, float(epsilon))
    scales = _unique_scales(changed, count, r=float(r), alpha=float(alpha), epsilon=float(epsilon))
    return _combine(base, deltas, count, scales)
