"""Capture one block call as an ATen graph with ``torch.export`` (DESIGN.md section 2).

``torch.export.export(block, args, kwargs, strict=False)`` keeps ``aten.linear`` and
``aten.scaled_dot_product_attention`` and lifts parameters to graph inputs, so one captured graph
serves every block of the same class: each block calls it with its own parameters.
``fx.symbolic_trace`` fails on Python control flow over shapes; ``make_fx`` silently bakes
data-dependent values into the graph, so neither is used.
"""

from __future__ import annotations

import functools
import inspect
import operator
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from .canonical import canonicalize


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.dtype, leaf.device.type)
    if leaf is None or isinstance(leaf, (bool, int, float, str)):
        return ("V", type(leaf).__name__, leaf)
    return ("O", type(leaf).__name__, repr(leaf))


def signature_of(args: tuple, kwargs: dict) -> tuple:
    """A hashable key of a call: pytree structure, tensor shapes/dtypes/devices, other values.

    A capture is specialised to it (non-tensor inputs and shapes are baked into the graph).
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    return (str(spec), tuple(_leaf_key(x) for x in flat))


_PLAIN = (type(None), bool, str)
_NUMBER = (int, float)


def _value_key(v: Any, numbers: bool, depth: int = 0) -> Any:
    """A hashable key of one attribute value a captured graph may depend on.

    Plain values by value (ints and floats only with ``numbers``: without, a ``"#"`` stands in and
    the runtime compares such peers numerically); sequences and dicts element-wise; tensor
    attributes by shape, dtype and device (their values are read live, see ``lifted_values``);
    callables by identity (two blocks with different activation functions, lambdas, bound
    methods); other objects (attention processors) by class and their own attributes.
    """
    if isinstance(v, _PLAIN):
        return (type(v).__name__, v)
    if isinstance(v, _NUMBER):
        return (type(v).__name__, v) if numbers else "#"
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), v.dtype, v.device.type)
    if depth >= 3:
        return ("O", type(v).__qualname__, id(v))
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_value_key(x, numbers, depth + 1) for x in v[:64]), len(v))
    if isinstance(v, dict):
        items = list(v.items())[:64]
        return ("dict", tuple((repr(k), _value_key(x, numbers, depth + 1)) for k, x in items), len(v))
    if isinstance(v, nn.Module):
        return ("M", type(v).__qualname__, id(v))
    if (isinstance(v, type) or inspect.isroutine(v) or isinstance(v, functools.partial)
            or (callable(v) and getattr(v, "__dict__", None) is None)):
        return ("F", getattr(v, "__qualname__", type(v).__qualname__), id(v))
    attrs = getattr(v, "__dict__", None)
    if attrs is None:
        return ("O", type(v).__qualname__, repr(v)[:200])
    return ("O", type(v).__qualname__, _attrs_key(attrs, numbers, depth + 1))


def _attrs_key(attrs: dict, numbers: bool, depth: int = 0) -> tuple:
    return tuple((k, _value_key(v, numbers, depth)) for k, v in sorted(attrs.items())
                 if not k.startswith("_") and k not in ("forward", "training"))


def structure_of(module: nn.Module, numbers: bool = True) -> tuple:
    """A hashable key of a block's structure: its submodule tree (names, classes, train / eval),
    parameter and buffer names/shapes/dtypes, and every public attribute of every submodule
    (``_value_key``: plain values, sequences, tensors' shapes, callables, attention processors).

    Blocks of one class can differ (a last block without a context output, a flag that changes
    control flow, a processor set on one block): a capture is shared only between blocks with the
    same structure. With ``numbers=False`` int/float values are left out (a layer index differs in
    every block; the runtime checks such peers numerically before sharing a capture). An
    instance ``forward`` (toca_fx's own, or another library's, refused by the runtime) is skipped.
    """
    parts = []
    for name, m in module.named_modules():
        attrs = _attrs_key(vars(m), numbers)
        params = tuple((k, tuple(p.shape), p.dtype) for k, p in m.named_parameters(recurse=False))
        bufs = tuple((k, None if b is None else (tuple(b.shape), b.dtype)) for k, b in m._buffers.items())
        parts.append((name, type(m).__qualname__, m.training, attrs, params, bufs))
    return tuple(parts)


class CaptureFailure(Exception):
    """The block could not be captured in one graph; the message is the reason."""


@dataclass
class Capture:
    """One block class captured for one input signature."""

    gm: torch.fx.GraphModule            # lifted graph: (params/buffers/constants..., user inputs...)
    lifted: list[tuple[str, str]]       # ("param"|"buffer"|"constant", target) per leading placeholder
    constants: dict[str, Any]
    in_spec: Any
    out_spec: Any
    num_user_inputs: int
    method: str
    seconds: float
    example_inputs: list[Any] = field(default_factory=list)   # the recorded user inputs (flat)

    def lifted_values(self, block: nn.Module) -> list[Any]:
        """The block's own parameters, buffers and tensor attributes, in the graph's input order.

        A tensor attribute (``self.scale = torch.tensor(...)``) is lifted by export as a constant
        of the captured block; it is read from ``block`` so that blocks sharing the capture (and a
        reassigned attribute) use their own value. Constants created inside forward stay captured.
        """
        vals = []
        for kind, target in self.lifted:
            if kind == "param":
                vals.append(block.get_parameter(target))
            elif kind == "buffer":
                vals.append(block.get_buffer(target))
            else:
                vals.append(_tensor_attribute(block, target, self.constants[target]))
        return vals

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        flat, _ = pytree.tree_flatten((args, kwargs))
        return flat

    def unflatten_outputs(self, flat_out: list[Any]) -> Any:
        return pytree.tree_unflatten(list(flat_out), self.out_spec)


def _tensor_attribute(block: nn.Module, target: str, captured: Any) -> Any:
    if not target.startswith("inner."):
        return captured
    *path, name = target[len("inner."):].split(".")
    owner = block
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return captured
    value = getattr(owner, name, None)
    return value if isinstance(value, torch.Tensor) else captured


def capture_block(block: nn.Module, args: tuple, kwargs: dict, call_original) -> Capture:
    """Export ``block`` for this call. ``call_original(*args, **kwargs)`` runs its real forward.

    Raises ``CaptureFailure`` with the reason when export cannot produce one graph, or when the
    graph mutates block state (a cache must not hide a side effect).
    """

    reassigned: list[str] = []

    class _Original(nn.Module):
        # Exports the block's own forward even while toca_fx has replaced block.forward.
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            # torch.export drops an assignment to a submodule's buffer (`self.b = self.b + 1`) from
            # the graph and restores the attribute afterwards: compare the state objects around the call.
            before = _state_objects(self.inner)
            out = call_original(*a, **k)
            reassigned.extend(_reassigned(before, _state_objects(self.inner)))
            return out

    t0 = time.perf_counter()
    wrapper = _Original(block)
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, tuple(args), dict(kwargs), strict=False)
    except Exception as exc:  # export raises many types; the reason is what matters
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureFailure(f"torch.export could not capture one graph ({type(exc).__name__}: {msg[:300]})") from exc
    if reassigned:
        raise CaptureFailure(f"block reassigns its state in forward ({', '.join(dict.fromkeys(reassigned))}); "
                             "caching would hide the side effect")
    sig = ep.graph_signature
    lifted: list[tuple[str, str]] = []
    user = 0
    prefix = "inner."
    for spec in sig.input_specs:
        if spec.kind == InputKind.PARAMETER:
            lifted.append(("param", spec.target[len(prefix):] if spec.target.startswith(prefix) else spec.target))
        elif spec.kind == InputKind.BUFFER:
            lifted.append(("buffer", spec.target[len(prefix):] if spec.target.startswith(prefix) else spec.target))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            lifted.append(("constant", spec.target))
        elif spec.kind == InputKind.USER_INPUT:
            user += 1
        else:
            raise CaptureFailure(f"captured graph takes an input of kind {spec.kind.name}, which toca_fx does not support")
    for spec in sig.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureFailure(f"block mutates its state ({spec.kind.name} of {spec.target!r}); caching would hide the side effect")
    kinds = [s.kind for s in sig.input_specs]
    if InputKind.USER_INPUT in kinds and kinds.index(InputKind.USER_INPUT) != len(lifted):
        raise CaptureFailure("captured graph interleaves user inputs with parameters")
    flat, _ = pytree.tree_flatten((tuple(args), dict(kwargs)))
    if len(flat) != user:
        raise CaptureFailure(f"captured graph takes {user} user inputs for {len(flat)} flattened call leaves")
    gm = ep.graph_module
    names = [f"{'parameter' if kind == 'param' else kind} {target!r}" for kind, target in lifted]
    names += [f"user input {i}" for i in range(user)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mutation = _first_mutation(gm, dict(zip(placeholders, names)))
    if mutation is not None:
        raise CaptureFailure(f"block mutates its state ({mutation}); caching would hide the side effect")
    # Shape checks are not needed at run time: the runtime only calls a capture for its own signature.
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERT_OPS and not node.users:
            gm.graph.erase_node(node)
    canonicalize(gm)   # type_as -> to.dtype, in-place writes into views of intermediates made functional
    constants = dict(ep.constants)
    return Capture(gm=gm, lifted=lifted, constants=constants, in_spec=ep.call_spec.in_spec,
                   out_spec=ep.call_spec.out_spec, num_user_inputs=user, method="torch.export",
                   seconds=time.perf_counter() - t0,
                   example_inputs=[x.detach().clone() if isinstance(x, torch.Tensor) else x for x in flat])


_ASSERT_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


# -- state mutation ------------------------------------------------------------------------------

def _state_objects(module: nn.Module) -> dict[str, Any]:
    """Every parameter, buffer and tensor attribute of ``module`` and its submodules, by name."""
    objs: dict[str, Any] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        pre = prefix + "." if prefix else ""
        for kind, table in (("parameter", m._parameters), ("buffer", m._buffers)):
            for k, v in table.items():
                objs[f"{kind} {pre + k!r}"] = v
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor):
                objs[f"tensor attribute {pre + k!r}"] = v
    return objs


def _reassigned(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The state entries replaced or deleted between two ``_state_objects`` snapshots, and the
    parameters/buffers added (a plain tensor attribute set for the first time is a memo, not state
    the graph reads)."""
    out = [k for k, v in before.items() if k not in after or after[k] is not v]
    out += [k for k in after if k not in before and not k.startswith("tensor attribute")]
    return out


def _tensor_nodes(value: Any) -> list[torch.fx.Node]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.fx.Node)]


def _first_mutation(gm: torch.fx.GraphModule, roots: dict[torch.fx.Node, str]) -> str | None:
    """The first write, in ``gm``, to a placeholder of ``roots`` (or to a view of one), described,
    or None. ``roots`` maps the placeholders that hold state (lifted parameters, buffers and
    constants, the caller's inputs) to their names.

    An argument that a schema annotates ``Tensor(a!)`` is written (``add_``, ``copy_``, ``fill_``,
    ``out=``, any custom op's mutated argument); one annotated ``Tensor(a)`` is aliased by the
    output (``view``, ``select``, ``split``), so a write to that output writes the placeholder.
    In-place ops on intermediate tensors are not reported. Subgraphs of higher-order ops
    (``wrap_with_set_grad_enabled``) are searched with their operands mapped to their placeholders.
    """
    alias: dict[torch.fx.Node, str] = dict(roots)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if target is operator.getitem:
            if isinstance(node.args[0], torch.fx.Node) and node.args[0] in alias:
                alias[node] = alias[node.args[0]]
            continue
        if isinstance(target, torch._ops.OpOverload):
            for i, arg in enumerate(target._schema.arguments):
                if arg.alias_info is None:
                    continue
                value = node.args[i] if i < len(node.args) and not arg.kwarg_only else node.kwargs.get(arg.name)
                hit = [alias[x] for x in _tensor_nodes(value) if x in alias]
                if not hit:
                    continue
                if arg.alias_info.is_write:
                    return f"{target} writes {hit[0]}"
                alias[node] = hit[0]        # a view of the placeholder
            continue
        subs = [(i, getattr(gm, a.target)) for i, a in enumerate(node.args)
                if isinstance(a, torch.fx.Node) and a.op == "get_attr"
                and isinstance(getattr(gm, a.target, None), torch.fx.GraphModule)]
        if not subs:
            continue
        operands = _tensor_nodes(node.args[subs[-1][0] + 1:]) + _tensor_nodes(node.kwargs)
        if not any(x in alias for x in operands):
            continue
        for _, sub in subs:
            phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
            if len(phs) == len(operands):
                sub_roots = {ph: alias[x] for ph, x in zip(phs, operands) if x in alias}
            else:   # operands not matched one to one: any placeholder may hold the state
                state = next(alias[x] for x in operands if x in alias)
                sub_roots = {ph: state for ph in phs}
            found = _first_mutation(sub, sub_roots)
            if found is not None:
                return f"{found} in {getattr(target, '__name__', target)}"
        # the outputs of a higher-order op are fresh tensors (its subgraph cannot return a view of an input)
    return None
