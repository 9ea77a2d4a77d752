"""One traced forward pass of a model, walked backwards into graph entries and edges.

The model runs on the ``meta`` device with meta copies of its parameters and buffers swapped in
for the call, so nothing is allocated or computed and the model is restored unchanged.
The autograd graph of the output is then walked depth-first (iteratively, so deep models do not
hit Python's recursion limit) into entries: parameters of supported layers, or the operation
itself when it has none.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from timm_ghn.errors import TimmGhnError
from timm_ghn.placement import Placement, extended_placement, is_norm_like

__all__ = ["Entry", "collect_entries", "operation_name", "parameter_primitive", "trace_output", "NORM_TYPES"]


NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def parameter_primitive(module: nn.Module, name: str) -> str | None:
    """Return the primitive of a parameter of ``module``, or None if the module is unsupported."""
    local = name.rsplit(".", 1)[-1]
    if isinstance(module, (nn.Conv2d, nn.Linear)) and local not in ("weight", "bias"):
        # Extra parameters of timm's subclasses (the ``gain`` of ``ScaledStdConv2d``) are not kernels.
        return None
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
    placement: Placement | None = None


#: Autograd operations that only reshape, cast or copy one input; an extended parameter is found
#: through a chain of them (``gamma.reshape(1, -1, 1, 1)``, ``cls_token.expand(B, -1, -1)``).
SHAPE_OPERATIONS = frozenset(
    ["View", "UnsafeView", "Reshape", "ReshapeAlias", "Expand", "Unsqueeze", "Squeeze", "Permute",
     "Transpose", "T", "Clone", "ToCopy", "Unbind", "Select", "Slice", "Repeat", "Flatten", "Alias"]
)


def _is_norm(module: nn.Module, extended: bool) -> bool:
    return isinstance(module, NORM_TYPES) or (extended and is_norm_like(module))


def _through_shape_operations(function):
    """Return the ``AccumulateGrad`` node and the chain of shape operations above it, or None."""
    chain = []
    while not hasattr(function, "variable"):
        if operation_name(type(function).__name__) not in SHAPE_OPERATIONS:
            return None
        children = [child for child, _ in function.next_functions if child is not None]
        if len(children) != 1:
            return None
        chain.append(function)
        function = children[0]
    return function, chain


def operation_name(label: str) -> str:
    return label.split("Backward")[0]


def _recurrent_stand_in(module: nn.RNNBase):
    """Return a forward for ``module`` that reads each weight once instead of once per time step.

    The real recurrence unrolls into one autograd node per step and gate (20k-44k entries for
    Sequencer2d). The stand-in keeps the output shape and the order ``W_ih -> b_ih -> W_hh ->
    b_hh`` of every layer and direction, with the directions concatenated as the real output is.
    The final state ``h_n`` (also returned as ``c_n`` of an LSTM) is the output of each layer and
    direction at its last step, so a model that reads only ``h_n`` still reaches the weights.
    """
    hidden = module.hidden_size
    directions = ["", "_reverse"] if module.bidirectional else [""]

    def forward(x, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            raise TimmGhnError(f"cannot trace {type(module).__name__} on a packed sequence")
        time_dim = 1 if module.batch_first and x.dim() == 3 else 0
        layer_input = x
        finals = []
        for layer in range(module.num_layers):
            outputs = []
            for suffix in directions:
                weight_ih = getattr(module, f"weight_ih_l{layer}{suffix}")
                weight_hh = getattr(module, f"weight_hh_l{layer}{suffix}")
                bias_ih = getattr(module, f"bias_ih_l{layer}{suffix}", None)
                bias_hh = getattr(module, f"bias_hh_l{layer}{suffix}", None)
                state = nn.functional.linear(layer_input, weight_ih, bias_ih)[..., : weight_hh.shape[1]]
                output = nn.functional.linear(state, weight_hh, bias_hh)[..., :hidden]
                outputs.append(output)
                # The forward direction ends at the last step and the reverse direction at the first.
                finals.append(output.select(time_dim, 0 if suffix else -1))
            layer_input = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        final = torch.stack(finals)
        return layer_input, ((final, final) if isinstance(module, nn.LSTM) else final)

    return forward


def _save_tensor_attributes(model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor], dict[str, set]]]:
    """Return each module's plain tensor attributes and the keys of its dict attributes."""
    saved = []
    for module in model.modules():
        tensors = {name: value for name, value in vars(module).items() if isinstance(value, torch.Tensor)}
        keys = {name: set(value) for name, value in vars(module).items() if isinstance(value, dict)}
        saved.append((module, tensors, keys))
    return saved


def _restore_tensor_attributes(saved: list[tuple[nn.Module, dict[str, torch.Tensor], dict[str, set]]]) -> None:
    """Put back each module's plain tensor attributes and drop meta tensors the trace added.

    A meta tensor added to a dict attribute is a per-device cache (LeViT's ``attention_bias_cache``),
    and a later trace would read it in place of the parameter behind it.
    """
    for module, tensors, keys in saved:
        added = [name for name, value in vars(module).items() if name not in tensors and isinstance(value, torch.Tensor)]
        for name in added:
            if module.__dict__[name].is_meta:
                del module.__dict__[name]
        module.__dict__.update(tensors)
        for name, before in keys.items():
            table = module.__dict__.get(name)
            if not isinstance(table, dict):
                continue
            for key in [k for k, v in table.items() if k not in before and isinstance(v, torch.Tensor) and v.is_meta]:
                del table[key]


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

    # Swap meta tensors into each module's own dicts and restore them afterwards. A module shared
    # under several names (CoaT's ``cpe``) is swapped once: ``torch.func.functional_call`` saves
    # and restores per name and left such modules with meta tensors (torch 2.14).
    meta_by_param: dict[int, torch.Tensor] = {}
    swaps: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
    for module in model.modules():
        for local_name, param in module._parameters.items():
            if param is not None:
                if id(param) not in meta_by_param:
                    meta_by_param[id(param)] = torch.empty_like(param, device="meta").requires_grad_(True)
                swaps.append((module._parameters, local_name, param, meta_by_param[id(param)]))
        for local_name, buffer in module._buffers.items():
            if buffer is not None:
                swaps.append((module._buffers, local_name, buffer, torch.empty_like(buffer, device="meta")))

    # The input takes the parameters' dtype: a float16 or bfloat16 model rejects a float32 input.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    sample = torch.empty((2, *input_size), device="meta", dtype=dtype)
    recurrent = [m for m in model.modules() if isinstance(m, nn.RNNBase) and not getattr(m, "proj_size", 0)]
    # A ``forward`` set on the instance (a wrapper or patch) is restored after the stand-in.
    own_forwards = {id(m): m.__dict__["forward"] for m in recurrent if "forward" in m.__dict__}
    # Pre-hooks of the legacy ``nn.utils.spectral_norm``/``weight_norm`` set ``module.weight`` as a
    # plain attribute on every call, and eval-mode caches keep tensors per device: the trace would
    # leave meta tensors in both.
    tensor_attributes = _save_tensor_attributes(model)
    try:
        for module in recurrent:
            module.forward = _recurrent_stand_in(module)
        for table, local_name, _, replacement in swaps:
            table[local_name] = replacement
        with torch.enable_grad():
            output = model(sample)
    finally:
        for table, local_name, original, _ in swaps:
            table[local_name] = original
        for module in recurrent:
            if id(module) in own_forwards:
                module.forward = own_forwards[id(module)]
            else:
                del module.forward
        _restore_tensor_attributes(tensor_attributes)

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


def collect_entries(
    outputs: list[torch.Tensor], param_names: dict, owners: dict, keep_all: bool = False, extended: bool = False
):
    """Walk the autograd graph depth-first from the outputs and return the entries and edges.

    Entries are registered in discovery order (output side first); an operation with parameters of
    supported layers registers those parameters, an operation without registers itself. Edges go
    from a producer's last entry to a consumer's first entry, except that an entry named like a
    bias is placed after the consumer's first entry (``weight -> bias``). With ``keep_all`` (the
    GHN-3 builder) parameters of unsupported layers and norm biases become entries too; the GHN-3
    filter removes them later. With ``extended``, parameters the original rules skip are placed as
    :func:`timm_ghn.placement.extended_placement` says, also when a chain of shape operations
    (``SHAPE_OPERATIONS``) lies between them and the operation that reads them.
    """
    entries: dict[object, Entry] = {}
    memo: dict[object, tuple[object | None, str]] = {}
    edges: list[tuple[object, object]] = []
    skipped: set[str] = set()
    # A parameter read by several operations (a module shared between blocks, as CoaT's
    # ``cpe``/``crpe``) gets one entry per use, keyed ``(parameter, operation)`` after the
    # first: a single entry would join the blocks into a cycle.
    used: set[object] = set()
    leaf_links: dict[tuple[object, object], tuple[object, str]] = {}
    # Extended parameters read by one operation form a chain in reading order (``cls_token ->
    # dist_token`` for a concatenation), so that none of them is left without a consumer.
    previous_leaf: dict[tuple[object, object], object] = {}

    def enter(function) -> list:
        label = type(function).__name__
        first = last = None
        if not hasattr(function, "variable"):
            leaves = []
            for child, _ in function.next_functions:
                if child is None:
                    continue
                # The chain of shape operations between this operation and the parameter, per use:
                # one operation may read a parameter through two chains (a token concatenated twice).
                chain = None
                if not hasattr(child, "variable"):
                    found = _through_shape_operations(child) if extended else None
                    if found is None:
                        continue
                    chain = (child, found[1])
                    child = found[0]
                name = param_names.get(id(child.variable))
                if name is None:
                    continue
                module_name, module = owners[name]
                local = name.rsplit(".", 1)[-1]
                shape = tuple(child.variable.shape)
                original = parameter_primitive(module, name) is not None and len(shape) <= 4
                placement = None if original or not extended else extended_placement(module, local, shape)
                if chain is not None and placement is None:
                    continue
                if not keep_all:
                    if not original and placement is None:
                        skipped.add(name)
                        continue
                    if _is_norm(module, extended) and local == "bias":
                        continue
                leaves.append((child, Entry(name, module, module_name, shape, placement=placement), chain))
            if not leaves:
                entry = Entry(label, None, None)
                keepdim = getattr(function, "_saved_keepdim", None) if label.startswith("Mean") else None
                entry.keepdim = None if keepdim is None else str(keepdim)
                if "Pool" in label:
                    kernel = getattr(function, "_saved_kernel_size", None)
                    entry.kernel_size = None if kernel is None else str(kernel)
                leaves = [(function, entry, None)]
            keyed = []
            keys_here: dict[object, object] = {}
            for child, entry, chain in leaves:
                if child in keys_here:
                    # A second read by the same operation (through another chain) is the same use.
                    key = keys_here[child]
                else:
                    key = child
                    if child is not function and child in used:
                        key = (child, function)
                    used.add(child)
                    entries.setdefault(key, entry)
                    keys_here[child] = key
                    keyed.append(key)
                if child is function:
                    memo[key] = (key, entry.name)
                else:
                    memo.setdefault(child, (key, entry.name))
                    leaf_links[(function, child)] = (key, entry.name)
                    if chain is not None:
                        # The chain's operations stand for the parameter: walking them adds nothing.
                        head, operations = chain
                        for operation in operations:
                            memo.setdefault(operation, (key, entry.name))
                        leaf_links[(function, head)] = (key, entry.name)
            first, last = keyed[0], keyed[-1]
            for previous, key in zip(keyed, keyed[1:]):
                previous_leaf[(function, key)] = previous
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
            link, label = leaf_links.get((function, child)) or memo[child]
            if link is not None and link is not first:
                previous = previous_leaf.get((function, link))
                if previous is not None and entries[link].placement is not None:
                    edges.append((previous, link))
                elif "bias" in label:
                    edges.append((first, link))
                else:
                    edges.append((link, first))
            if new:
                stack.append(child_frame)
    return entries, edges, skipped
