"""Averaging (model soup, Wortsman et al. 2022) and mergekit's ``linear``: θ = Σ w_i θ_i / Σ w_i.

The average runs over the recipe's ``models``; a base model listed there is one of them, with
its weight. An unlisted ``base_model`` is not averaged by ``average``, and ``linear`` (which in
mergekit always averages it) asks for it to be listed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

WEIGHT = Param("weight", 1.0, help="the model's weight in the weighted mean")


@merge_method(
    "average",
    per_model=(WEIGHT,),
    params=(Param("normalize", True, kind=bool, help="divide by the sum of the weights"),),
    needs_base=False,
    paper="https://arxiv.org/abs/2203.05482",
    summary="mean of the fine-tuned models (model soup); per-model weights give a weighted mean",
    # mergekit's linear always averages base_model too; `average` takes an unlisted base_model as
    # the reference only (tensor names, config, tokenizer). The recipe reads this flag.
    aliases={"linear": {"include_base": True}},
)
def average(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], normalize: bool = True, **_: object) -> torch.Tensor:
    import torch

    total = torch.zeros_like(tensors[0])
    for w, theta in zip(weight, tensors):
        total.add_(theta, alpha=w)
    if normalize:
        divisor = float(sum(weight))
        total.div_(divisor if abs(divisor) >= 1e-8 else 1.0)
    return total
