"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere.

Each tensor x_k is split into its norm r_k = ‖x_k‖ (the whole tensor flattened) and its direction
u_k = x_k / r_k. The merged direction μ is the point of the sphere that minimises the weighted
sum of squared geodesic distances to the u_k, found by Riemannian gradient steps:

    start:  μ = normalise(Σ_k α_k u_k)        (u_1 when that sum is ~0)
    repeat max_iter times, or until ‖T‖ < tol:
        θ_k = arccos(μ · u_k)
        T   = Σ_k α_k · θ_k / sin θ_k · (u_k − (μ · u_k) μ)    (terms with θ_k < tol left out)
        μ   ← normalise(cos‖T‖ · μ + sin‖T‖ · T / ‖T‖)
    θ = (Σ_k a_k r_k) · μ

with equal weights a_k = 1/N over the N tensors and α_k the same weights renormalised over the
tensors whose norm exceeds ``tol`` (the others have no direction and only enter the scale).

As in mergekit, the points are the models and, when the recipe names one, the base model as one
more equally weighted point (mergekit adds an unlisted base_model to the inputs and its karcher
averages every input); without base_model only the models are averaged. mergekit reads no
per-model weight for this method, so a ``weight`` is ignored with a warning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch


def karcher_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher mean of `tensors` on the sphere, scaled by their weighted mean norm.

    Args:
        tensors: The points (same shape, float32).
        weights: One weight per tensor; they scale the norms as given and are renormalised
            over the tensors with a direction for the mean direction.
        max_iter: Most gradient steps.
        tol: Norms, angles and step lengths below it count as zero.

    Returns:
        A new tensor of the inputs' shape (the only input itself when there is one).
    """
    import torch

    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    points = [(x / r, a) for x, r, a in zip(tensors, norms, weights) if float(r) > tol]
    if not points:
        return torch.zeros_like(tensors[0])
    total = sum(a for _, a in points)
    units = [u.reshape(-1) for u, _ in points]
    alphas = [a / total for _, a in points]

    mu = torch.zeros_like(units[0])
    for u, a in zip(units, alphas):
        mu += a * u
    length = torch.linalg.vector_norm(mu)
    mu = units[0].clone() if float(length) < tol else mu / length

    for _ in range(max_iter):
        step = torch.zeros_like(mu)
        for u, a in zip(units, alphas):
            cos = torch.dot(mu, u).clamp(-1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < tol:
                continue
            step += a * (angle / torch.sin(angle)) * (u - cos * mu)
        length = torch.linalg.vector_norm(step)
        if float(length) < tol:
            break
        mu = torch.cos(length) * mu + torch.sin(length) * (step / length)
        size = torch.linalg.vector_norm(mu)
        if float(size) > tol:
            mu = mu / size

    scale = sum(a * r for a, r in zip(weights, norms))
    return (scale * mu).reshape(tensors[0].shape)


@merge_method(
    "karcher",
    params=(
        Param("max_iter", 10, kind=int, low=0, help="most Riemannian gradient steps"),
        Param("tol", 1e-5, low=0.0, help="norms, angles and step lengths below it count as zero (stops the iteration)"),
    ),
    needs_base=True,
    base_optional=True,
    paper="https://arxiv.org/abs/2603.04972",
    summary="Riemannian (Karcher) mean of the tensors' directions on the sphere, scaled by their mean norm",
)
def karcher(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5,
            **_: object) -> torch.Tensor:
    points = list(tensors) + ([base] if base is not None else [])
    return karcher_mean(points, [1.0 / len(points)] * len(points), max_iter=int(max_iter), tol=float(tol))
