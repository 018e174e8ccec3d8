"""Squared gradients for every parameter, including those accelerate offloads to CPU or disk.

A model loaded with an accelerate device map keeps offloaded parameters on the ``meta``
device; before each module's forward an ``AlignDevicesHook`` materialises them as fresh
tensors, and afterwards drops them. Those fresh tensors receive gradients during backward but
are gone before anyone can read ``.grad``. So instead of reading ``.grad`` after backward,
`squared_grad_hooks` registers a post-accumulate-grad hook on every parameter tensor that
takes part in a forward pass (the resident ones once; the materialised ones each time their
module runs, through a hook appended after accelerate's): the hook adds ``weight · grad²`` to
a buffer keyed by the parameter's name and clears ``.grad``, so every backward pass
contributes exactly one squared gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def is_offloaded(model: Any) -> bool:
    """Whether some parameter of `model` lives off-device (accelerate CPU/disk offload)."""
    return any(p.device.type == "meta" for p in model.parameters())


class SquaredGradSink:
    """Accumulates ``weight · grad²`` per parameter name (float32, on CPU for offloaded ones).

    Attributes:
        weight: The factor applied to the next backward pass's squared gradients.
        count: How many backward passes contributed (counted on the first parameter).
    """

    def __init__(self, names: dict[int, str], shapes: dict[str, torch.Size], devices: dict[str, torch.device]):
        self.weight = 1.0
        self.count = 0
        self._buffers = {n: torch.zeros(shapes[n], dtype=torch.float32, device=devices[n]) for n in shapes}
        self._names = names
        self._first = next(iter(shapes), None)

    def add(self, name: str, grad: torch.Tensor) -> None:
        buf = self._buffers[name]
        g = grad.detach().to(device=buf.device, dtype=torch.float32)
        buf.addcmul_(g, g, value=self.weight)
        if name == self._first:
            self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        return {n: b.cpu() for n, b in self._buffers.items()}


@contextlib.contextmanager
def squared_grad_hooks(model: Any, only: set[str] | None = None) -> Iterator[SquaredGradSink]:
    """Within the block, each backward pass adds ``sink.weight · grad²`` to `sink`'s buffers.

    Parameters are named as ``model.named_parameters()`` names them (tied parameters once).
    ``requires_grad`` is switched on for every parameter inside the block (for those named in
    `only`, and off for the others, when given) and restored after.
    """
    every = list(model.named_parameters())
    named = [(n, p) for n, p in every if only is None or n in only]
    shapes = {n: p.shape for n, p in named}
    devices = {n: (p.device if p.device.type != "meta" else torch.device("cpu")) for n, p in named}
    sink = SquaredGradSink({id(p): n for n, p in named}, shapes, devices)
    handles: list[Any] = []
    requires = {n: p.requires_grad for n, p in every}

    def hook_for(name: str):
        def hook(p: torch.Tensor) -> None:
            sink.add(name, p.grad)
            p.grad = None
        return hook

    for n, p in every:
        p.requires_grad_(only is None or n in only)
    for n, p in named:
        if p.device.type != "meta":
            handles.append(p.register_post_accumulate_grad_hook(hook_for(n)))
    added_hooks = _hook_offloaded_modules(model, hook_for, {n for n, _ in named}) if any(p.device.type == "meta" for _, p in named) else []
    try:
        yield sink
    finally:
        for h in handles:
            h.remove()
        for module in added_hooks:
            _remove_appended_hook(module)
        for n, p in model.named_parameters():
            p.grad = None
            if n in requires:
                p.requires_grad_(requires[n])


def _hook_offloaded_modules(model: Any, hook_for, names: set[str]) -> list[Any]:
    """Append, after accelerate's hook, one that hooks the freshly materialised parameters."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class MaterialisedGradHook(ModelHook):
        def __init__(self, names: dict[str, str]):
            self.names = names  # local parameter name -> model parameter name

        def pre_forward(self, module, *args, **kwargs):
            for local, full in self.names.items():
                p = module._parameters.get(local)
                if p is not None and p.device.type != "meta" and p.requires_grad and not getattr(p, "_hfmerge_hooked", False):
                    p.register_post_accumulate_grad_hook(hook_for(full))
                    p._hfmerge_hooked = True  # a tied parameter materialised once is hooked once
            return args, kwargs

    # Only parameters accelerate materialises need it; the `model.named_parameters()` name of a
    # tied parameter is its first occurrence, and that is the one recorded.
    first_name: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), n)
    hooked = []
    for prefix, module in model.named_modules():
        local = {ln: first_name[id(p)] for ln, p in module.named_parameters(recurse=False, remove_duplicate=False)
                 if p.device.type == "meta" and first_name.get(id(p)) in names}
        if local and hasattr(module, "_hf_hook"):
            add_hook_to_module(module, MaterialisedGradHook(local), append=True)
            hooked.append(module)
    return hooked


def _remove_appended_hook(module: Any) -> None:
    from accelerate.hooks import SequentialHook

    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, SequentialHook) and len(hook.hooks) > 1:
        hook.hooks = hook.hooks[:-1]
        if len(hook.hooks) == 1:
            module._hf_hook = hook.hooks[0]
