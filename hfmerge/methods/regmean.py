"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For a linear layer y = W x (W: out × in) of M models, RegMean picks the W that best reproduces
every model's outputs on that model's own inputs, min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², whose
closed form is

    W*ᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,    G̃_i = α G_i + (1 − α) diag(G_i)

with G_i = X_iᵀ X_i / T_i the Gram matrix (in × in) of the layer's inputs on model i's task
(mean over the T_i non-padding tokens, as the reference code normalises it), and α
(``alpha``; FusionBench's ``reduce_non_diagonal_ratio``) shrinking the off-diagonal entries
towards a diagonal, better conditioned system. Every other tensor (embeddings, norms, biases,
weights of layers without a Gram matrix) is the plain average, as in the reference.

The Gram matrices come from the model's ``fisher:`` file, or the Fisher engine computes them
on the model's task with forward hooks on every ``nn.Linear`` (`hfmerge.fisher.gram`) and
caches them. The merge passes them as ``importances`` (``importance="gram"``): one in × in
matrix per model for a linear weight, None for a tensor without one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

# How the Gram matrices are computed from the recipe's tasks (models without a `fisher:` file).
REGMEAN_DATA_PARAMS = (
    Param("regmean_examples", 256, kind=int, low=1, help="validation examples per task the Gram matrices are computed on"),
    Param("regmean_seed", 0, kind=int, low=0, help="seed of the example draw"),
)


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 − α) diag(G): the off-diagonal entries scaled by α, the diagonal kept."""
    import torch

    out = gram * alpha
    out.diagonal().copy_(torch.diagonal(gram))
    return out


def regmean_solve(tensors: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """W* of one linear weight: (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, transposed back to out × in.

    Inputs no model's data ever reached (a zero diagonal entry in every G_i: the row and
    column of the PSD sum are zero too) leave the system singular and W*'s column undefined;
    those columns take the plain average, and the rest of the solution is unaffected (the
    zero row and column decouple them). The solve is ``torch.linalg.solve`` in float32, on the
    system scaled to a unit diagonal (Jacobi scaling: the same solution, better conditioned).

    Raises:
        ValueError: A Gram matrix with a negative diagonal entry (no Gram matrix has one).
    """
    import torch

    dtype = tensors[0].dtype
    out_features, in_features = tensors[0].shape
    device = tensors[0].device
    a = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
    b = torch.zeros(in_features, out_features, dtype=torch.float32, device=device)
    for i, (w, g) in enumerate(zip(tensors, grams)):
        if bool((torch.diagonal(g) < 0).any()):
            raise ValueError(f"the Gram matrix of model {i} has a negative diagonal entry; it is not XᵀX of any inputs")
        g = shrink_off_diagonal(g.to(device=device, dtype=torch.float32), alpha)
        a += g
        b += g @ w.to(torch.float32).t()
    unused = torch.diagonal(a) == 0
    if bool(unused.any()):
        mean_t = torch.stack([w.to(torch.float32) for w in tensors]).mean(dim=0).t()
        a.diagonal()[unused] = 1.0
        b[unused] = mean_t[unused]
    # Jacobi scaling: solve (D A D) Y = D B with D = diag(A)^(-1/2), then X = D Y. The same
    # solution, but inputs of very different scales (a neuron that barely fires) no longer
    # make the float32 system ill-conditioned.
    d = torch.diagonal(a).rsqrt()
    scaled = a * d[:, None] * d[None, :]
    return (torch.linalg.solve(scaled, b * d[:, None]) * d[:, None]).t().to(dtype)


@merge_method(
    "regmean",
    params=(
        Param("alpha", 0.9, low=0.0, high=1.0,
              help="scale of the Gram matrices' off-diagonal entries (FusionBench's reduce_non_diagonal_ratio); 0: diagonal only"),
        *REGMEAN_DATA_PARAMS,
    ),
    needs_base=False,
    needs_importance=True,
    importance="gram",
    paper="https://arxiv.org/abs/2212.09849",
    summary="per linear layer, the least-squares merge of the models' outputs on their own inputs (Gram matrices); other tensors averaged",
)
def regmean(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, importances: Sequence[torch.Tensor] | None = None,
            alpha: float = 0.9, **_: object) -> torch.Tensor:
    import torch

    if importances is None:
        return torch.stack(list(tensors)).mean(dim=0)
    return regmean_solve(tensors, importances, alpha)
