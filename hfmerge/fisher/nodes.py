"""Fisher Mask Nodes (Thennal et al. 2024): one importance per attention head and FFN neuron.

Instead of a Fisher per parameter, every attention head and every FFN intermediate neuron gets
a mask variable, all ones, multiplying its output; the masks are the only tensors that need
gradients, so a backward pass costs far less than a full Fisher's. The node Fisher is, per
example and option, the weighted square of ∂ℓ/∂mask (same modes as the diagonal Fisher),
summed over examples and divided by N.

Masking a head's attention probabilities scales that head's context vector by the same
factor, so the head mask is applied where the heads' contexts enter the attention output
projection (input of T5's ``o``, of BERT's ``attention.output.dense``); the neuron mask where
the intermediate activations enter the FFN output projection (T5's ``wo``, BERT's
``output.dense``). Gradients with respect to these masks equal those of the paper's masks.

Spreading node importances to weights (`NodeLayout.importance`), as the reference does:
query and key rows of head h get head h's Fisher; value, attention output and the attention
sub-layer's layer norm get the layer's mean head Fisher; FFN input rows of neuron j get
neuron j's Fisher; FFN output and the FFN sub-layer's layer norm get the layer's mean neuron
Fisher; everything else (embeddings, final norms, heads, pooler) a universal weight: the mean
over attention layers of the mean head Fisher plus the mean over FFN layers of the mean
neuron Fisher. T5's relative attention bias table ([buckets, heads]) gets head h's Fisher in
column h.

Supported: T5 (original and v1.1 / flan layouts: encoder self-attention, decoder self- and
cross-attention, FFN) and BERT-family encoders (``...attention.self`` / ``intermediate``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FisherError, NodeLayoutError
from ..evaluation.lm import model_device
from ..evaluation.scoring import EncodedExample
from .diagonal import FisherStats, weighted_rows

HEADS = "heads:"
NEURONS = "neurons:"


@dataclass(frozen=True)
class Unit:
    """One masked group of nodes: the heads of one attention, or the neurons of one FFN.

    Attributes:
        key: ``heads:<module path>`` or ``neurons:<module path>``.
        size: Number of heads or neurons.
        head_dim: Width of one head (attention units only).
        projection: Path of the Linear whose input the mask multiplies.
    """

    key: str
    size: int
    head_dim: int
    projection: str


# Rules: "rows" (row r gets node r // head_dim), "cols" (column h gets head h), "mean".
@dataclass
class NodeLayout:
    """Where the nodes are and how their importances spread to named tensors."""

    units: list[Unit]
    rules: dict[str, tuple[str, str]] = field(default_factory=dict)  # tensor name -> (unit key, rule)

    def importance(self, fisher: dict[str, torch.Tensor], name: str, shape: Sequence[int]) -> torch.Tensor:
        """The importance of every entry of tensor `name`, broadcastable to `shape` (float32)."""
        rule = self.rules.get(name)
        if rule is None:
            return universal_weight(fisher).reshape([1] * len(shape)) if shape else universal_weight(fisher)
        key, how = rule
        f = fisher[key].float()
        if how == "mean":
            return f.mean().reshape([1] * len(shape))
        if how == "cols":
            return f.reshape([1] * (len(shape) - 1) + [-1])
        unit = next(u for u in self.units if u.key == key)
        per_row = f.repeat_interleave(unit.head_dim) if key.startswith(HEADS) else f
        if per_row.numel() != shape[0]:
            raise NodeLayoutError(f"tensor {name!r} has {shape[0]} rows but {key} spreads to {per_row.numel()}")
        return per_row.reshape([-1] + [1] * (len(shape) - 1))


def universal_weight(fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over attention units of the mean head Fisher + mean over FFN units of the mean neuron Fisher."""
    heads = [v.float().mean() for k, v in fisher.items() if k.startswith(HEADS)]
    neurons = [v.float().mean() for k, v in fisher.items() if k.startswith(NEURONS)]
    total = torch.zeros(())
    if heads:
        total = total + torch.stack(heads).mean()
    if neurons:
        total = total + torch.stack(neurons).mean()
    return total


def _linear_names(prefix: str, module: Any) -> list[str]:
    return [f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)]


def node_layout(model: Any) -> NodeLayout:
    """Find the attention heads and FFN neurons of a live (or meta-device) model.

    Raises:
        NodeLayoutError: No supported attention or FFN module was found.
    """
    units: list[Unit] = []
    rules: dict[str, tuple[str, str]] = {}
    modules = dict(model.named_modules())

    def parent_norm(prefix: str) -> list[tuple[str, Any]]:
        # T5 sub-layers: <block>.layer.<j>.{SelfAttention|EncDecAttention|DenseReluDense} beside <block>.layer.<j>.layer_norm
        parent = prefix.rsplit(".", 1)[0]
        norm = modules.get(f"{parent}.layer_norm")
        return [(f"{parent}.layer_norm", norm)] if norm is not None else []

    for prefix, m in modules.items():
        # T5 attention: q, k, v, o and n_heads.
        if all(hasattr(m, a) for a in ("q", "k", "v", "o", "n_heads", "key_value_proj_dim")):
            key = HEADS + prefix
            units.append(Unit(key, int(m.n_heads), int(m.key_value_proj_dim), f"{prefix}.o"))
            for n in _linear_names(f"{prefix}.q", m.q) + _linear_names(f"{prefix}.k", m.k):
                rules[n] = (key, "rows")
            for n in _linear_names(f"{prefix}.v", m.v) + _linear_names(f"{prefix}.o", m.o):
                rules[n] = (key, "mean")
            bias = getattr(m, "relative_attention_bias", None)
            if bias is not None:
                rules[f"{prefix}.relative_attention_bias.weight"] = (key, "cols")
            for norm_prefix, norm in parent_norm(prefix):
                for n in _linear_names(norm_prefix, norm):
                    rules[n] = (key, "mean")
        # T5 FFN: wo and wi (ReLU) or wi_0 / wi_1 (gated).
        elif hasattr(m, "wo") and (hasattr(m, "wi") or hasattr(m, "wi_0")):
            key = NEURONS + prefix
            units.append(Unit(key, int(m.wo.in_features), 1, f"{prefix}.wo"))
            for wi in ("wi", "wi_0", "wi_1"):
                if hasattr(m, wi):
                    for n in _linear_names(f"{prefix}.{wi}", getattr(m, wi)):
                        rules[n] = (key, "rows")
            for n in _linear_names(f"{prefix}.wo", m.wo):
                rules[n] = (key, "mean")
            for norm_prefix, norm in parent_norm(prefix):
                for n in _linear_names(norm_prefix, norm):
                    rules[n] = (key, "mean")
        # BERT-family attention: .self (query/key/value, num_attention_heads) and .output (dense, LayerNorm).
        elif hasattr(m, "self") and hasattr(getattr(m, "self"), "num_attention_heads") and hasattr(m, "output") and hasattr(m.output, "dense"):
            sa = m.self
            key = HEADS + prefix
            units.append(Unit(key, int(sa.num_attention_heads), int(sa.attention_head_size), f"{prefix}.output.dense"))
            for n in _linear_names(f"{prefix}.self.query", sa.query) + _linear_names(f"{prefix}.self.key", sa.key):
                rules[n] = (key, "rows")
            for sub, mod in (("self.value", sa.value), ("output.dense", m.output.dense), ("output.LayerNorm", getattr(m.output, "LayerNorm", None))):
                if mod is not None:
                    for n in _linear_names(f"{prefix}.{sub}", mod):
                        rules[n] = (key, "mean")
        # BERT-family layer: intermediate.dense (input of the neurons) and output.dense.
        elif hasattr(m, "intermediate") and hasattr(m, "output") and hasattr(getattr(m, "intermediate"), "dense") and hasattr(m.output, "dense"):
            key = NEURONS + prefix
            units.append(Unit(key, int(m.output.dense.in_features), 1, f"{prefix}.output.dense"))
            for n in _linear_names(f"{prefix}.intermediate.dense", m.intermediate.dense):
                rules[n] = (key, "rows")
            for sub, mod in (("output.dense", m.output.dense), ("output.LayerNorm", getattr(m.output, "LayerNorm", None))):
                if mod is not None:
                    for n in _linear_names(f"{prefix}.{sub}", mod):
                        rules[n] = (key, "mean")
    if not any(u.key.startswith(HEADS) for u in units) or not any(u.key.startswith(NEURONS) for u in units):
        raise NodeLayoutError(f"{type(model).__name__}: Fisher Mask Nodes supports T5 and BERT-family models (attention heads and FFN neurons "
                              "it can mask were not found); use merge_method: fisher for this architecture")
    # Tied aliases share their parameter's rule.
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    for names in by_id.values():
        ruled = [rules[n] for n in names if n in rules]
        if ruled:
            for n in names:
                rules[n] = ruled[0]
    return NodeLayout(units, rules)


def layout_from_config(config: dict, label: str) -> NodeLayout:
    """`node_layout` of the architecture in `config`, built on the meta device (no weights)."""
    from ..checkpoints.aliases import meta_model

    model, problem = meta_model(config)
    if model is None:
        raise NodeLayoutError(f"{label}: {problem}; Fisher Mask Nodes needs the architecture to find its heads and neurons")
    try:
        return node_layout(model)
    except NodeLayoutError as exc:
        raise NodeLayoutError(f"{label}: {exc}") from None


def node_fisher(model: Any, examples: Sequence[EncodedExample], labels: Sequence[int], *, mode: str = "exact", seed: int = 0,
                progress: bool = False, desc: str = "Fisher nodes", stats: list[FisherStats] | None = None,
                device: str | torch.device | None = None, batch_size: int = 32, **_: Any) -> dict[str, torch.Tensor]:
    """The Fisher of every head and neuron mask: ``{"heads:<path>": [H], "neurons:<path>": [d_ff]}``.

    Every (example, option) row of a batch gets its own copy of the masks, so one backward pass
    of the batch's summed ℓ gives each row's own mask gradient exactly (row r's ℓ depends only
    on row r's masks): per-example squares at the cost of one batched pass, and the weights
    need no gradients at all (``requires_grad`` is off during the computation).
    """
    from tqdm.auto import tqdm

    from .loglik import batch_logliks, pair_batches

    layout = node_layout(model)
    examples = list(examples)
    if not examples:
        raise FisherError("no examples to compute the Fisher on")
    dev = model_device(model, device)
    sums = {u.key: torch.zeros(u.size, dtype=torch.float32) for u in layout.units}
    current: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []

    def pre_hook(unit: Unit):
        def hook(module, args):
            if unit.key not in current:  # outside the gradient passes the masks are ones
                return None
            (x, *rest) = args
            mask = current[unit.key].to(x.dtype)  # [rows, nodes]
            middle = [1] * (x.dim() - 2)
            if unit.key.startswith(HEADS):
                x = (x.reshape(*x.shape[:-1], unit.size, unit.head_dim) * mask.view(mask.shape[0], *middle, unit.size, 1)).reshape(x.shape)
            else:
                x = x * mask.view(mask.shape[0], *middle, unit.size)
            return (x, *rest)
        return hook

    for u in layout.units:
        handles.append(modules[u.projection].register_forward_pre_hook(pre_hook(u)))
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    rows = weighted_rows(model, examples, labels, mode, random.Random(seed), dev)
    for p in model.parameters():
        p.requires_grad_(False)
    bar = tqdm(total=len(rows), desc=desc, unit="grad", disable=not progress, leave=False)
    try:
        for batch in pair_batches(model, examples, rows, batch_size, dev):
            r = batch.input_ids.shape[0]
            current.clear()
            current.update({u.key: torch.ones(r, u.size, device=dev, requires_grad=True) for u in layout.units})
            grads = torch.autograd.grad(batch_logliks(model, batch).sum(), list(current.values()))
            for key, g in zip(current, grads):
                sums[key].add_((batch.weights.unsqueeze(1) * g.detach().float().pow(2)).sum(0).cpu())
            bar.update(r)
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires.get(name, True))
        model.train(was_training)
    for v in sums.values():
        v.div_(len(examples))
    if stats is not None:
        stats.append(FisherStats(len(examples), len(rows), "nodes", time.perf_counter() - start))
    return sums
