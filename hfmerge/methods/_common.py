"""Building blocks shared by the task-vector methods (TIES, DARE, DELLA, Breadcrumbs, SCE, task arithmetic)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """τ_i = θ_i − θ_pre, stacked on a new first dimension (M, *shape); a fresh tensor the
    caller may modify in place."""
    import torch

    return torch.stack(list(tensors)).sub_(base)


def per_model(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model scalars shaped (M, 1, ..., 1) to broadcast against a stack of M tensors."""
    import torch

    return torch.tensor(list(values), dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def order_statistics(magnitude: torch.Tensor, ranks: Sequence[int]) -> list[tuple[float, int, int]]:
    """The values at 0-based `ranks` of a flat, non-negative float32 or float64 tensor, each with
    the count of entries below it and equal to it, in one histogram pass.

    Non-negative floats order like their bit patterns read as integers, so a histogram
    of the top 16 bits locates each rank's bucket, and a selection among that bucket's entries
    (usually a small share of the tensor) finishes it: a radix select, several times cheaper
    than a sort or than one ``kthvalue`` per rank on large tensors.
    """
    import torch

    wide = magnitude.dtype == torch.float64
    if sys.byteorder == "little":
        # The top 16 bits are the last int16 of each value: a strided view, copied once, is
        # cheaper than a shift of the whole tensor (and bincount takes int16 as it is).
        start, step = (3, 4) if wide else (1, 2)
        top = magnitude.view(torch.int16)[start::step].contiguous()
    else:
        top = magnitude.view(torch.int64 if wide else torch.int32) >> (48 if wide else 16)
    cumulative = torch.bincount(top, minlength=1 << 15).cumsum(0)
    out = []
    for rank in ranks:
        bucket = int((cumulative <= rank).sum())  # the first bucket whose cumulative count passes `rank`
        before = int(cumulative[bucket - 1]) if bucket else 0
        candidates = magnitude[top == bucket]
        value = candidates.kthvalue(rank - before + 1).values
        out.append((float(value), before + int((candidates < value).sum()), int((candidates == value).sum())))
    return out


def trim_top_magnitude_(delta: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """TIES step 1, in place: keep the largest-magnitude entries of one task vector.

    With `threshold` (whole-model trim) keep entries with |δ| >= threshold; otherwise keep the
    top ``int(density * numel)`` entries of this tensor (per-tensor trim, as mergekit does).
    """
    import torch

    if threshold is not None:
        return delta.mul_(delta.abs() >= threshold)
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return delta.zero_()
    # A float mask: multiplying by a bool tensor takes a slow type-promoting path on the CPU.
    return delta.mul_(top_k_mask(delta.detach().abs().reshape(-1), k, dtype=delta.dtype).view(delta.shape))


def top_k_mask(values: torch.Tensor, k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A mask of the `k` largest entries of a flat, non-negative tensor; among equal values at
    the cut the earlier positions are taken (the first k of a descending stable sort). Found by
    `order_statistics`, several times faster than ``topk`` on large tensors.

    Boolean, or 1/0 in `dtype` when given (written directly: multiplying a float tensor by a
    boolean one takes a slow type-promoting path on the CPU).
    """
    import torch

    n = values.numel()
    kind = dtype or torch.bool
    if k <= 0:
        return torch.zeros(n, dtype=kind, device=values.device)
    if k >= n:
        return torch.ones(n, dtype=kind, device=values.device)
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()  # exact for half precision
    ((value, below, ties),) = order_statistics(values, (n - k,))
    wanted = k - (n - below - ties)  # ties to take, 1 ≤ wanted ≤ ties
    if wanted == ties:
        return torch.ge(values, value, out=torch.empty(n, dtype=kind, device=values.device))
    mask = torch.gt(values, value, out=torch.empty(n, dtype=kind, device=values.device))
    # The ties at the cut, in position order: the first `wanted` of them are kept.
    mask[torch.nonzero(values == value).squeeze(1)[:wanted]] = 1
    return mask


def variance_over_models(deltas: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """The population variance across the first dimension, equal bit for bit to
    ``deltas.var(dim=0, unbiased=False)`` on the CPU, several times faster.

    torch reduces over a leading dimension one output entry at a time (Welford's update in
    float64 for every floating dtype). The same updates, model by model over whole
    slices in float64, round identically and vectorise; they run in chunks of `chunk` entries
    so that the float64 work space stays a few MiB.
    """
    import torch

    m = deltas.shape[0]
    flat = deltas.reshape(m, -1)
    out = torch.empty(flat.shape[1], dtype=deltas.dtype, device=deltas.device)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start:start + chunk]
        mean = torch.zeros(part.shape[1], dtype=torch.float64, device=deltas.device)
        m2 = torch.zeros_like(mean)
        after = torch.empty_like(mean)
        for i in range(m):
            x = part[i].to(torch.float64)  # `deltas` itself when already float64: never written
            delta = x - mean
            mean.add_(delta / float(i + 1))
            m2.add_(delta.mul_(torch.sub(x, mean, out=after)))
        out[start:start + chunk] = m2.div_(float(m))
    return out.view(deltas.shape[1:])


def random_drop_(delta: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> torch.Tensor:
    """DARE, in place: keep each entry with probability `density` (= 1 − p), rescale survivors by 1/density."""
    import torch

    if density >= 1:
        return delta
    # Drawn where the generator lives (the CPU for seeded merges) and moved to `delta`'s device,
    # so a seed gives the same mask whatever device the arithmetic runs on.
    where = generator.device if generator is not None else delta.device
    mask = bernoulli_mask(density, delta.shape, delta.dtype, generator, where)
    delta.mul_(mask.to(delta.device))
    return delta.div_(density) if rescale else delta


def bernoulli_mask(probability: "float | torch.Tensor", shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator | None,
                   device: "torch.device | str") -> torch.Tensor:
    """1 with `probability` (a number, or a tensor of `shape`), else 0: the mask that
    ``torch.bernoulli`` draws from `generator`, bit for bit.

    On the CPU in float32 and float64, ``torch.bernoulli`` compares one uniform draw per entry
    with its probability, the same draws in the same order as ``torch.rand``; ``rand`` then a
    comparison is about 3× faster. Other dtypes and devices draw with ``torch.bernoulli``
    itself (a test checks the two agree, so a torch release that changed either would show).
    """
    import torch

    if torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64):
        uniform = torch.rand(tuple(shape), dtype=dtype, device=device, generator=generator)
        return torch.lt(uniform, probability, out=uniform)
    if not isinstance(probability, torch.Tensor):
        probability = torch.full(tuple(shape), probability, dtype=dtype, device=device)
    return torch.bernoulli(probability, generator=generator)


def restore_l1_(delta: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """In place: scale a sparsified task vector back to the L1 norm `before` it had (mergekit's
    ``rescale``, ‖τ‖₁ / ‖τ̃‖₁); nothing is scaled when either norm is below 1e-7."""
    after = delta.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return delta
    return delta.mul_(before / after)


def keep_matching_l1_(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """In place: zero the entries of `delta` outside `keep` (a 0/1 or bool mask of its shape),
    then with `rescale` restore its L1 norm (`restore_l1_`)."""
    before = delta.abs().sum() if rescale else None
    delta.mul_(keep)
    return delta if before is None else restore_l1_(delta, before)


def combine(base: torch.Tensor, deltas: torch.Tensor, weight: Sequence[float], *, lambda_: float, normalize: bool, consensus: bool,
            elected_positive: torch.Tensor | None = None) -> torch.Tensor:
    """θ_pre + λ · mix(w_i τ_i): the shared last step of task arithmetic, TIES, DARE, DELLA, Breadcrumbs and SCE.

    Without consensus: Σ w_i τ_i (divided by Σ w_i when `normalize`). With consensus (TIES
    steps 2–3): the sign of Σ w_i τ_i is elected per entry (+ on an exact tie, as in
    mergekit), or given as `elected_positive` (True where + is elected); entries agreeing with
    it are summed and, when `normalize`, divided by the sum of their weights (the disjoint mean
    for unit weights). Zero entries never agree. Agreement is judged on w_i τ_i, so a given
    election is meant for non-negative weights.

    `deltas` (M, *shape) is consumed: it is scaled in place, and the consensus is accumulated
    model by model, so the work space stays at about one extra stack.
    """
    import torch

    weighted = deltas.mul_(per_model(weight, deltas))
    if consensus:
        if elected_positive is None:
            elected_positive = weighted.sum(dim=0) >= 0
        # Float arithmetic only (bool masks take slow type-promoting paths on the CPU): the
        # elected sign as ±1, and per model a 1/0 agreement mask. Multiplying by ±1 or by 1/0
        # is exact, so the sums equal those of the masked task vectors bit for bit.
        sign = elected_positive.to(base.dtype).mul_(2).sub_(1)
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        agree = torch.empty_like(base)
        for i, w in enumerate(weight):
            torch.gt(weighted[i] * sign, 0, out=agree)
            mixed.addcmul_(weighted[i], agree)
            divisor.add_(agree, alpha=w)
        divisor.masked_fill_(divisor == 0, 1)
    else:
        mixed = weighted.sum(dim=0)
        total = float(sum(weight))
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return mixed.mul_(lambda_).add_(base)


def density_unset(recipe: "Recipe") -> bool:
    """Whether the recipe leaves ``density`` at its default for every model (nothing trimmed
    or dropped), which is worth a warning for the methods whose point is to sparsify."""
    return "density" not in recipe.model_defaults and all("density" not in m.parameters and "density" not in m.slice_parameters for m in recipe.model_entries)


def warn_without_density(advice: str) -> Callable[["Recipe", str], list[str]]:
    """A `validate` hook that refuses nothing and returns `advice` (``{name}``: the method's
    name) when the recipe leaves ``density`` at its default for every model."""

    def validate(recipe: "Recipe", source: str) -> list[str]:
        return [advice.format(name=recipe.method.name)] if density_unset(recipe) else []

    return validate
