"""Capture one block call as an ATen graph with ``torch.export`` (DESIGN.md section 2).

``torch.export.export(block, args, kwargs, strict=False)`` keeps ``aten.linear`` and
``aten.scaled_dot_product_attention`` and lifts parameters to graph inputs, so one captured graph
serves every block of the same class: each block calls it with its own parameters.
``fx.symbolic_trace`` fails on Python control flow over shapes; ``make_fx`` silently bakes
data-dependent values into the graph, so neither is used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind


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


def structure_of(module: nn.Module, numbers: bool = True) -> tuple:
    """A hashable key of a block's structure: its submodule tree (names, classes), parameter and
    buffer names/shapes/dtypes, and the plain-valued attributes of every submodule.

    Blocks of one class can differ (a last block without a context output, a flag that changes
    control flow): a capture is shared only between blocks with the same structure. With
    ``numbers=False`` int/float attributes are left out (a layer index differs in every block;
    the runtime checks such peers numerically before sharing a capture).
    """
    kinds = (bool, str, int, float) if numbers else (bool, str)
    parts = []
    for name, m in module.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(m).items()
                             if not k.startswith("_") and k != "training"
                             and (v is None or (isinstance(v, kinds) and (numbers or type(v) in (bool, str))))))
        params = tuple((k, tuple(p.shape), p.dtype) for k, p in m.named_parameters(recurse=False))
        bufs = tuple((k, tuple(b.shape), b.dtype) for k, b in m.named_buffers(recurse=False))
        parts.append((name, type(m).__qualname__, attrs, params, bufs))
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
        vals = []
        for kind, target in self.lifted:
            if kind == "param":
                vals.append(block.get_parameter(target))
            elif kind == "buffer":
                vals.append(block.get_buffer(target))
            else:
                vals.append(self.constants[target])
        return vals

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list[Any]:
        flat, _ = pytree.tree_flatten((args, kwargs))
        return flat

    def unflatten_outputs(self, flat_out: list[Any]) -> Any:
        return pytree.tree_unflatten(list(flat_out), self.out_spec)


def capture_block(block: nn.Module, args: tuple, kwargs: dict, call_original) -> Capture:
    """Export ``block`` for this call. ``call_original(*args, **kwargs)`` runs its real forward.

    Raises ``CaptureFailure`` with the reason when export cannot produce one graph, or when the
    graph mutates block state (a cache must not hide a side effect).
    """

    class _Original(nn.Module):
        # Exports the block's own forward even while toca_fx has replaced block.forward.
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            return call_original(*a, **k)

    t0 = time.perf_counter()
    wrapper = _Original(block)
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, tuple(args), dict(kwargs), strict=False)
    except Exception as exc:  # export raises many types; the reason is what matters
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureFailure(f"torch.export could not capture one graph ({type(exc).__name__}: {msg[:300]})") from exc
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
    # Shape checks are not needed at run time: the runtime only calls a capture for its own signature.
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERT_OPS and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
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
