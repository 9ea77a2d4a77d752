"""One traced forward pass of a model, walked backwards into graph entries and edges.

The model runs on the ``meta`` device through ``torch.func.functional_call`` with meta copies of
its parameters and buffers, so nothing is allocated or computed and the model is not changed.
The autograd graph of the output is then walked depth-first (iteratively, so deep models do not
hit Python's recursion limit) into entries: parameters of supported layers, or the operation
itself when it has none.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from timm_ghn.errors import TimmGhnError

__all__ = ["Entry", "collect_entries", "operation_name", "parameter_primitive", "trace_output", "NORM_TYPES"]


NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def parameter_primitive(module: nn.Module, name: str) -> str | None:
    """Return the primitive of a parameter of ``module``, or None if the module is unsupported."""
    if isinstance(module, nn.Conv2d):
        if "bias" in name:
            return "bias"
        if module.groups > 1:
            return "dil_conv" if min(module.dilation) > 1 else "sep_conv"
        return "conv"
    if isinstance(module, nn.Linear):
        return "bias" if "bias" in name else "conv"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(module, nn.LayerNorm):
        return "ln"
    if isinstance(module, nn.MultiheadAttention):
        return "bias" if "bias" in name else "conv"
    if isinstance(module, nn.Embedding):
        return "pos_enc"
    return None


@dataclasses.dataclass
class Entry:
    name: str
    module: nn.Module | None
    module_name: str | None
    shape: tuple[int, ...] | None = None
    keepdim: str | None = None
    kernel_size: str | None = None


def operation_name(label: str) -> str:
    return label.split("Backward")[0]


def trace_output(model: nn.Module, input_size: tuple[int, ...]) -> tuple[list[torch.Tensor], dict]:
    """Run one forward pass on the meta device and map each traced parameter to its name."""
    names_by_param: dict[int, str] = {}
    owners: dict[str, tuple[str, nn.Module]] = {}
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if param is None:
                continue
            full_name = f"{module_name}.{local_name}" if module_name else local_name
            owners[full_name] = (module_name, module)
            names_by_param.setdefault(id(param), full_name)

    meta_by_param: dict[int, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in meta_by_param:
            meta_by_param[id(param)] = torch.empty_like(param, device="meta").requires_grad_(True)
        replacements[name] = meta_by_param[id(param)]
    for name, buffer in model.named_buffers(remove_duplicate=False):
        replacements[name] = torch.empty_like(buffer, device="meta")

    sample = torch.empty((2, *input_size), device="meta")
    with torch.enable_grad():
        output = torch.func.functional_call(model, replacements, (sample,), tie_weights=True, strict=False)

    if isinstance(output, torch.Tensor):
        outputs = [output]
    elif isinstance(output, dict):
        outputs = list(output.values())
    elif isinstance(output, (tuple, list)):
        outputs = [output[0]]
    else:
        raise TimmGhnError(f"cannot trace {type(model).__name__}: its forward returned {type(output).__name__}")
    param_names = {id(meta_by_param[pid]): names_by_param[pid] for pid in meta_by_param}
    # The meta tensors are returned too: identities in ``param_names`` are valid while they live.
    return outputs, {"param_names": param_names, "owners": owners, "tensors": list(meta_by_param.values())}


def collect_entries(outputs: list[torch.Tensor], param_names: dict, owners: dict, keep_all: bool = False):
    """Walk the autograd graph depth-first from the outputs and return the entries and edges.

    Entries are registered in discovery order (output side first); an operation with parameters of
    supported layers registers those parameters, an operation without registers itself. Edges go
    from a producer's last entry to a consumer's first entry, except that an entry named like a
    bias is placed after the consumer's first entry (``weight -> bias``). With ``keep_all`` (the
    GHN-3 builder) parameters of unsupported layers and norm biases become entries too; the GHN-3
    filter removes them later.
    """
    entries: dict[object, Entry] = {}
    memo: dict[object, tuple[object | None, str]] = {}
    edges: list[tuple[object, object]] = []
    skipped: set[str] = set()

    def enter(function) -> list:
        label = type(function).__name__
        first = last = None
        if not hasattr(function, "variable"):
            leaves = []
            for child, _ in function.next_functions:
                if child is None or not hasattr(child, "variable"):
                    continue
                name = param_names.get(id(child.variable))
                if name is None:
                    continue
                module_name, module = owners[name]
                local = name.rsplit(".", 1)[-1]
                if not keep_all:
                    if parameter_primitive(module, name) is None or child.variable.dim() > 4:
                        skipped.add(name)
                        continue
                    if isinstance(module, NORM_TYPES) and local == "bias":
                        continue
                leaves.append((child, Entry(name, module, module_name, tuple(child.variable.shape))))
            if not leaves:
                entry = Entry(label, None, None)
                keepdim = getattr(function, "_saved_keepdim", None) if label.startswith("Mean") else None
                entry.keepdim = None if keepdim is None else str(keepdim)
                if "Pool" in label:
                    kernel = getattr(function, "_saved_kernel_size", None)
                    entry.kernel_size = None if kernel is None else str(kernel)
                leaves = [(function, entry)]
            for key, entry in leaves:
                if key not in entries:
                    entries[key] = entry
                memo[key] = (key, entry.name)
            first, last = leaves[0][0], leaves[-1][0]
        memo[function] = (last, label)
        return [function, first, list(function.next_functions), 0]

    for output in outputs:
        if output is None or output.grad_fn is None:
            continue
        root = output.grad_fn
        if root in memo:
            continue
        stack = [enter(root)]
        while stack:
            frame = stack[-1]
            function, first, children, index = frame
            if index >= len(children):
                stack.pop()
                continue
            frame[3] = index + 1
            child = children[index][0]
            if child is None:
                continue
            new = child not in memo
            if new:
                child_frame = enter(child)
            link, label = memo[child]
            if link is not None and link is not first:
                if "bias" in label:
                    edges.append((first, link))
                else:
                    edges.append((link, first))
            if new:
                stack.append(child_frame)
    return entries, edges, skipped
