"""Per-(example, option) squared gradients from layer hooks: the ``hooks`` implementation.

A batch of (example, option) rows goes through one ordinary forward pass and one backward
pass of Σ_r ℓ_r. Rows do not interact in an eval-mode transformer, so the gradient that
reaches a module's output at row r is row r's own ∂ℓ_r/∂output. Hooks record, per module
call, what the module's parameter gradient is made of, and each row's parameter gradient is
formed from it during the backward pass, one parameter at a time, as soon as every call of
that parameter has its output gradient (then the call's tensors are let go of):

* ``nn.Linear`` (weight [out, in]): G_r = Σ_t g_rt a_rtᵀ (g the output gradient, a the
  input at token t); bias: Σ_t g_rt. transformers' ``Conv1D`` (GPT-2) is the same with the
  weight transposed;
* ``nn.Embedding``: G_r adds g_rt to the row of token t's id (no gradient at
  ``padding_idx``). An embedding called with batch-1 ids whose output is broadcast over the
  batch (BERT's and GPT-2's position embeddings) has its output expanded to the batch, so
  that the gradient arriving there is per row. T5's relative attention bias (computed once
  per forward, shared by every row and every layer of a stack) is expanded to the batch
  where ``compute_bias`` returns it;
* ``nn.LayerNorm`` and RMS norms (T5's ``T5LayerNorm``, Llama's ``LlamaRMSNorm``, ...):
  weight Σ_t g_rt ⊙ n_rt with n the normalised input (recomputed from the input; for RMS
  norms the output is checked to be weight ⊙ n), bias Σ_t g_rt.

A parameter reached by several calls or tied modules (T5's shared embedding: encoder and
decoder inputs and, tied, the LM head) sums its per-row pieces before squaring. Σ_r w_r G_r²
is then added to the Fisher without keeping a model-sized gradient for any row:

* per row (``outer`` form): G_r is formed a tile of output rows at a time (about 262,000
  entries), squared and added with its weight while the tile is in cache;
* when a row has only a few tokens with a non-zero gradient (T ≤ `GRAM_MAX_TOKENS`, e.g.
  the decoder side of T5, the LM head of a decoder-only model) as one matrix product,
  Σ_r w_r G_r² = Σ_r w_r Σ_{t,s} (g_rt ⊙ g_rs)(a_rt ⊙ a_rs)ᵀ (``gram`` form);
* embedding rows as a sparse correction on top of the dense part of a tied parameter:
  (D + S)² = D² + S (2D + S) on the rows S touches.

Parameters of any other module, and any call whose shapes break these rules (a module
called with a different batch, an RMS norm that is not weight ⊙ n, ...), are not guessed:
`hooks_fisher` reports them and `diagonal_fisher` computes them with the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Rows' weight gradients formed at once in the ``outer`` form, in entries.
TILE_ENTRIES = 1 << 18
# Weights of at least this many entries take one matrix product per row (small ones: one
# batched product for all rows).
PER_ROW_MIN_ENTRIES = 1 << 16
# Up to this many tokens with a non-zero gradient per row, the ``gram`` form is used.
GRAM_MAX_TOKENS = 3
# (example, option) rows per forward/backward pass.
HOOKS_CHUNK = 32


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _is_rms_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    params = dict(module.named_parameters(recurse=False))
    return ((name.endswith("RMSNorm") or name.endswith("LayerNorm")) and not isinstance(module, nn.LayerNorm)
            and set(params) == {"weight"} and params["weight"].dim() == 1 and _eps(module) is not None)


def _eps(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def module_kind(module: nn.Module) -> str | None:
    """How `hooks` covers a module's own parameters (None: it does not)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return None if module.max_norm is not None or module.scale_grad_by_freq else "embedding"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if _is_rms_norm(module):
        return "rmsnorm"
    return None


def uncovered_parameters(model: nn.Module) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of parameters that no supported
    module owns, so `hooks` cannot form their per-row gradients."""
    first = _first_names(model)
    out = []
    for _, module in model.named_modules():
        if module_kind(module) is None:
            out += [first[id(p)] for p in module._parameters.values() if p is not None]
    return sorted(set(out))


def _first_names(model: nn.Module) -> dict[int, str]:
    first: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), n)
    return first


@dataclass
class _Terms:
    """What one parameter's per-row gradient is made of, over all its calls."""

    outer: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (left [B,T,p], right [B,T,q]): Σ_t leftᵀ right
    rows: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (ids [B,T], values [B,T,q])
    vec: list[torch.Tensor] = field(default_factory=list)  # [B, d]: the per-row gradient itself


@dataclass(eq=False)
class _Call:
    """One call of a hooked module: what its parameters' per-row gradients are formed from."""

    kind: str
    module: nn.Module
    local: dict[str, str]  # the module's parameter name -> the model's
    x: torch.Tensor  # input (ids for embeddings)
    y: torch.Tensor | None = None  # output (norms: to check the formula)
    g: torch.Tensor | None = None  # output gradient, once the backward pass reached it
    open: int = 0  # parameters of this call not yet added to the Fisher


class _Recorder:
    """The hooks of one pass: per call, inputs in the forward and output gradients in the backward."""

    def __init__(self, model: nn.Module):
        first = self._first = _first_names(model)
        self.modules: list[tuple[nn.Module, str, dict[str, str]]] = []
        for _, module in model.named_modules():
            kind = module_kind(module)
            local = {ln: first[id(p)] for ln, p in module._parameters.items() if p is not None}
            if kind is not None and local:
                self.modules.append((module, kind, local))
        self.bias_modules = [m for _, m in model.named_modules()
                             if isinstance(getattr(m, "relative_attention_bias", None), nn.Embedding) and callable(getattr(m, "compute_bias", None))]
        self._bias_tables = {m.relative_attention_bias for m in self.bias_modules}
        self.rows = 0
        # The calls of the current pass, by parameter, and how many of them still wait for
        # their output gradient; `sink(name, terms)` receives a parameter's terms once all
        # its calls have one, so that inputs and gradients are let go of during the backward.
        self.sink: Any = None
        self._by_param: dict[str, list[_Call]] = {}
        self._waiting: dict[str, int] = {}
        self.unsupported: dict[str, str] = {}
        self._bias_ids: torch.Tensor | None = None
        self._inside_bias: nn.Module | None = None

    # -- registration ------------------------------------------------------------------------

    @contextlib.contextmanager
    def attached(self) -> Iterator[_Recorder]:
        handles = [m.register_forward_hook(self._forward_hook(m, kind, local)) for m, kind, local in self.modules]
        wrapped = []
        for m in self.bias_modules:
            m.compute_bias = self._wrap_compute_bias(m, m.compute_bias)
            wrapped.append(m)
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for m in wrapped:
                del m.compute_bias  # the class's method again

    def _flag(self, local: dict[str, str], reason: str) -> None:
        for name in local.values():
            self.unsupported.setdefault(name, reason)

    def _forward_hook(self, module: nn.Module, kind: str, local: dict[str, str]):
        def hook(mod, args, output):
            if not isinstance(output, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
                self._flag(local, f"{type(mod).__name__} called in an unexpected way")
                return None
            x = args[0].detach()
            if mod in self._bias_tables:  # a relative attention bias: batch-free ids, only within compute_bias
                if self._inside_bias is None or mod is not self._inside_bias.relative_attention_bias:
                    self._flag(local, f"{type(mod).__name__} used as a relative attention bias outside compute_bias")
                    return None
                self._bias_ids = x
                return output if output.requires_grad else output.detach().requires_grad_()
            expand = kind == "embedding" and x.dim() >= 2 and x.shape[0] == 1 and self.rows > 1 and output.shape[0] == 1
            if x.shape[0] != self.rows and not expand:
                self._flag(local, f"{type(mod).__name__} called with batch {tuple(x.shape)} for {self.rows} rows")
                return None
            out = output if output.requires_grad else output.detach().requires_grad_()
            if expand:
                out = out.expand(self.rows, *out.shape[1:])
                x = x.expand(self.rows, *x.shape[1:])
            call = _Call(kind, mod, local, x, output.detach() if kind == "rmsnorm" else None)
            self._add(call)
            out.register_hook(lambda g: self._arrived(call, g))
            return out if out is not output else None
        return hook

    def _wrap_compute_bias(self, module: nn.Module, original):
        emb = module.relative_attention_bias
        local = {"weight": self._first[id(emb.weight)]}

        def compute_bias(*args, **kwargs):
            self._inside_bias, self._bias_ids = module, None
            try:
                bias = original(*args, **kwargs)
            finally:
                self._inside_bias = None
            ids = self._bias_ids
            if ids is None or bias.dim() != 4 or bias.shape[0] != 1 or ids.dim() != 2 or tuple(bias.shape[2:]) != tuple(ids.shape):
                self._flag(local, "relative attention bias of an unexpected shape")
                return bias
            expanded = bias.expand(self.rows, -1, -1, -1)
            call = _Call("relbias", emb, local, ids)
            self._add(call)
            expanded.register_hook(lambda g: self._arrived(call, g))
            return expanded
        return compute_bias

    # -- per-parameter terms -----------------------------------------------------------------

    def _add(self, call: _Call) -> None:
        for name in call.local.values():
            self._by_param.setdefault(name, []).append(call)
            self._waiting[name] = self._waiting.get(name, 0) + 1
            call.open += 1

    def _arrived(self, call: _Call, g: torch.Tensor) -> None:
        call.g = g.detach()
        for name in call.local.values():
            self._waiting[name] -= 1
            if self._waiting[name] == 0:
                self._finish(name)

    def finish(self) -> None:
        """After the backward pass: the parameters some of whose calls got no gradient (their
        output did not reach ℓ)."""
        for name in list(self._by_param):
            self._finish(name)
        self._waiting.clear()

    def _finish(self, name: str) -> None:
        terms = _Terms()
        for call in self._by_param.pop(name, []):
            if call.g is not None:
                self._add_terms(call, name, terms)
            call.open -= 1
            if call.open == 0:  # let go of the call's tensors
                call.x = call.y = call.g = None
        if terms.outer or terms.rows or terms.vec:
            self.sink(name, terms)

    def _add_terms(self, call: _Call, name: str, terms: _Terms) -> None:
        """Add what `call` contributes to parameter `name`'s per-row gradient to `terms`."""
        g, rows, kind, local = call.g.float(), self.rows, call.kind, call.local
        if kind == "relbias":
            ids = call.x.reshape(1, -1).expand(rows, -1)
            terms.rows.append((ids, g.permute(0, 2, 3, 1).reshape(rows, ids.shape[1], -1)))
        elif kind in ("linear", "conv1d"):
            g2 = g.reshape(rows, -1, g.shape[-1])
            if name == local.get("bias"):
                terms.vec.append(g2.sum(1))
            else:
                a = call.x.to(device=g.device, dtype=torch.float32).reshape(rows, -1, call.x.shape[-1])
                terms.outer.append((g2, a) if kind == "linear" else (a, g2))
        elif kind == "embedding":
            ids = call.x.to(g.device).reshape(rows, -1)
            values = g.reshape(rows, ids.shape[1], -1)
            if call.module.padding_idx is not None:  # no gradient reaches the padding row
                values = values * (ids != call.module.padding_idx).unsqueeze(-1)
            terms.rows.append((ids, values))
        else:  # layernorm / rmsnorm
            mod = call.module
            d = g.shape[-1] if kind == "rmsnorm" else int(torch.tensor(mod.normalized_shape).prod())
            if name == local.get("bias"):
                terms.vec.append(g.reshape(rows, -1, d).sum(1))
                return
            y = None if call.y is None else call.y.to(g.device)
            n = self._normalised(kind, mod, local, call.x.to(device=g.device, dtype=torch.float32), y)
            if n is not None:
                terms.vec.append((g * n).reshape(rows, -1, d).sum(1))

    def _normalised(self, kind: str, mod: nn.Module, local: dict[str, str], x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
        if kind == "layernorm":
            return torch.nn.functional.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(mod))
        w = mod.weight
        yf = y.float()
        if w.device.type != "meta":
            expected = w.detach().to(device=n.device, dtype=torch.float32) * n
        else:  # offloaded: the output must still be a per-channel multiple of n
            scale = (yf * n).flatten(0, -2).sum(0) / (n * n).flatten(0, -2).sum(0).clamp(min=1e-30)
            expected = scale * n
        tol = 1e-4 if y.dtype == torch.float32 else 2e-2
        if not torch.allclose(yf, expected, rtol=tol, atol=tol * float(yf.abs().max().clamp(min=1e-30))):
            self._flag(local, f"{type(mod).__name__} is not weight ⊙ (x / rms(x))")
            return None
        return n


def _inconsistent(terms: _Terms, shape: torch.Size) -> str | None:
    """Why `terms` cannot describe a gradient of `shape` (None: they can)."""
    if terms.vec and (terms.outer or terms.rows):
        return "used both as a vector and as a matrix"
    if any(v.shape[1:].numel() != shape.numel() for v in terms.vec):
        return "a per-row gradient of another size"
    if any(len(shape) != 2 or (left.shape[2], right.shape[2]) != tuple(shape) for left, right in terms.outer):
        return "a weight gradient of another shape"
    if any(len(shape) != 2 or values.shape[2] != shape[1] for _, values in terms.rows):
        return "embedding rows of another width"
    return None


def add_weighted_squares(fisher: torch.Tensor, terms: _Terms, weights: torch.Tensor) -> None:
    """fisher += Σ_r w_r G_r², G_r the per-row gradient `terms` describe."""
    w = weights.to(torch.float32)
    if terms.vec:
        total = sum(terms.vec)
        fisher.add_((w @ (total * total).reshape(total.shape[0], -1)).reshape(fisher.shape).to(fisher.device))
        return
    left = right = None
    if terms.outer:
        left = torch.cat([t[0] for t in terms.outer], dim=1)
        right = torch.cat([t[1] for t in terms.outer], dim=1)
        left, right = _pack_nonzero(left, right)
        same = fisher.device == left.device
        dense = fisher if same else torch.zeros(fisher.shape, dtype=torch.float32, device=left.device)
        if left.shape[1] <= GRAM_MAX_TOKENS:
            _gram(dense, left, right, w)
        else:
            _outer(dense, left, right, w)
        if not same:
            fisher.add_(dense.to(fisher.device))
    if terms.rows:
        _rows(fisher, terms.rows, w, left, right)


def _pack_nonzero(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's tokens with a non-zero product to the front and drop the all-zero tail."""
    nz = (left != 0).any(-1) & (right != 0).any(-1)
    keep = int(nz.sum(1).max()) if nz.numel() else 0
    if keep == left.shape[1]:
        return left, right
    order = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :keep]
    mask = torch.gather(nz, 1, order).unsqueeze(-1)
    left = torch.gather(left, 1, order.unsqueeze(-1).expand(-1, -1, left.shape[2])) * mask
    right = torch.gather(right, 1, order.unsqueeze(-1).expand(-1, -1, right.shape[2]))
    return left, right


def _outer(dense: torch.Tensor, left: torch.Tensor, right: torch.Tensor, w: torch.Tensor) -> None:
    rows, _, p = left.shape
    q = right.shape[2]
    flat = dense.view(p, q)
    if p * q >= PER_ROW_MIN_ENTRIES:
        # One matrix product per row and output tile, squared into the Fisher while in cache.
        lt = left.transpose(1, 2).contiguous()
        step = max(1, TILE_ENTRIES // q)
        buf = torch.empty(min(step, p), q, dtype=torch.float32, device=left.device)
        weights = w.tolist()
        for i in range(0, p, step):
            part = flat[i:i + step]
            g = buf[:part.shape[0]]
            for r in range(rows):
                if weights[r] != 0.0:
                    torch.mm(lt[r, i:i + step], right[r], out=g)
                    part.addcmul_(g, g, value=weights[r])
        return
    lt = left.transpose(1, 2)
    step = max(1, TILE_ENTRIES // max(rows * q, 1))
    for i in range(0, p, step):
        g = torch.bmm(lt[:, i:i + step], right)
        g.square_()
        flat[i:i + step].view(-1).addmv_(g.view(rows, -1).t(), w)


def _gram(dense: torch.Tensor, left: torch.Tensor, right: torch.Tensor, w: torch.Tensor) -> None:
    t = left.shape[1]
    if t == 0:
        return
    iu = torch.triu_indices(t, t, device=left.device)
    factor = torch.where(iu[0] == iu[1], 1.0, 2.0).to(left.device)  # (t, s) and (s, t) once, doubled
    ll = left[:, iu[0]] * left[:, iu[1]] * (w[:, None, None] * factor[None, :, None])
    rr = right[:, iu[0]] * right[:, iu[1]]
    dense.view(left.shape[2], right.shape[2]).addmm_(ll.reshape(-1, left.shape[2]).t(), rr.reshape(-1, right.shape[2]))


def _rows(fisher: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], w: torch.Tensor,
          left: torch.Tensor | None, right: torch.Tensor | None) -> None:
    """Embedding rows: S_r adds values onto the rows of their ids; with a dense part D_r
    (a tied LM head) the square is (D + S)², of which D² is already in `fisher`."""
    num = fisher.shape[0]
    ids = torch.cat([i.to(torch.long) for i, _ in parts], dim=1)
    values = torch.cat([v for _, v in parts], dim=1)
    rows = ids.shape[0]
    keys = (torch.arange(rows, device=ids.device).unsqueeze(1) * num + ids).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    s = torch.zeros(unique.shape[0], values.shape[2], dtype=torch.float32, device=values.device)
    s.index_add_(0, inverse, values.reshape(-1, values.shape[2]))
    r, v = unique // num, unique % num
    if left is not None:
        # D_r at row v: Σ_t left[r, t, v] · right[r, t]
        d = torch.bmm(left[r, :, v].unsqueeze(1), right[r]).squeeze(1)
        contribution = s * (2 * d + s)
    else:
        contribution = s * s
    fisher.index_add_(0, v.to(fisher.device), (w[r].unsqueeze(1) * contribution).to(fisher.device))


def hooks_fisher(model: Any, examples: Sequence[Any], pairs: Sequence[tuple[int, int, float]], device: torch.device,
                 bar: Any, *, exact: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """Σ over `pairs` of w · (∇ℓ)² for every parameter the hooks cover, and the parameters
    they do not (name → reason; their entries in the result are to be replaced).

    Args:
        model: In ``eval()`` mode; its parameters' ``requires_grad`` is switched off for the
            passes (no parameter gradient is computed at all) and restored after.
        examples: Tokenised examples.
        pairs: (example index, option index, weight) rows (`diagonal.weighted_rows`), in
            example order.
        device: Where inputs go.
        bar: A progress bar counting examples.
        exact: The weights are p_k = softmax over the example's options of ℓ, taken from the
            same forward pass (`pairs` then lists every option of every example; their
            weights are ignored).

    Returns:
        (Fisher sums by parameter name, parameters not covered → reason, rows with a
        non-zero weight).
    """
    from .loglik import batch_logliks, pair_batches

    named = list(model.named_parameters())
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device if p.device.type != "meta" else torch.device("cpu"))
              for n, p in named}
    missing = {n: "no layer hook covers it" for n in uncovered_parameters(model)}
    requires = {n: p.requires_grad for n, p in named}
    recorder = _Recorder(model)
    count = 0
    try:
        for _, p in named:
            p.requires_grad_(False)
        with recorder.attached():
            for part in example_chunks(pairs, HOOKS_CHUNK, length=lambda n: _length(examples[n])):
                batch = pair_batches(model, examples, part, len(part), device)[0]
                recorder.rows = len(part)

                def sink(name: str, terms: _Terms, batch=batch) -> None:
                    problem = _inconsistent(terms, fisher[name].shape)
                    if problem:
                        recorder.unsupported.setdefault(name, problem)
                    if name not in recorder.unsupported and name not in missing:
                        add_weighted_squares(fisher[name], terms, batch.weights)

                recorder.sink = sink
                with torch.enable_grad():
                    ll = batch_logliks(model, batch)
                    if exact:
                        batch.weights = _softmax_per_example(ll.detach(), [n for n, _, _ in part]).to(batch.weights.device)
                    if not ll.requires_grad:  # no hooked module on the way to ℓ
                        recorder.unsupported.update({n: "ℓ does not depend on any hooked layer" for n, _ in named})
                    else:
                        ll.sum().backward()
                recorder.finish()
                count += int((batch.weights > 0).sum())
                bar.update(len({n for n, _, _ in part}))
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            if n in requires:
                p.requires_grad_(requires[n])
    missing.update(recorder.unsupported)
    return {k: v.cpu() for k, v in fisher.items()}, missing, count


def example_chunks(pairs: Sequence[tuple[int, int, float]], size: int, length: Any = None) -> list[list[tuple[int, int, float]]]:
    """`pairs` cut into chunks of at most `size` rows that never split an example (an example
    with more rows than `size` is a chunk of its own); with `length` (example index → a
    length), examples of similar lengths share chunks, so that little padding is computed."""
    groups: list[list[tuple[int, int, float]]] = []
    for row in pairs:
        if groups and groups[-1][-1][0] == row[0]:
            groups[-1].append(row)
        else:
            groups.append([row])
    if length is not None:
        groups.sort(key=lambda g: length(g[0][0]))
    chunks: list[list[tuple[int, int, float]]] = []
    for group in groups:
        if chunks and len(chunks[-1]) + len(group) <= size:
            chunks[-1].extend(group)
        else:
            chunks.append(list(group))
    return chunks


def _length(example: Any) -> int:
    contexts = example.contexts or (example.prompt_ids,)
    return max(len(c) for c in contexts) + max((len(o) for o in example.option_ids), default=0)


def _softmax_per_example(ll: torch.Tensor, owners: list[int]) -> torch.Tensor:
    """p of every row: softmax of ℓ over the rows of the same example (in double, as
    `diagonal.option_weights` does)."""
    out = torch.empty(len(owners), dtype=torch.float64)
    values = ll.double().cpu()
    start = 0
    while start < len(owners):
        end = start
        while end < len(owners) and owners[end] == owners[start]:
            end += 1
        out[start:end] = torch.softmax(values[start:end], dim=0)
        start = end
    return out.float()
