"""FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode`` (on fake tensors for variant graphs).

Importing this module registers a FLOP formula for the CPU kernel that fused attention dispatches
to (``aten._scaled_dot_product_flash_attention_for_cpu``): torch 2.13 has none, so every
``FlopCounterMode`` on CPU counted fused attention as 0 FLOPs. Every place toca_fx or its
benchmarks count FLOPs imports ``toca_fx`` (and so this module) first.

Partial variants are linear in each site's k (every counted op is a matmul or attention whose
query count is k), so flops(k_1..k_m) = base + sum a_s k_s is fitted from m + 1 fake runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """QK^T and PV of one attention call: 2 * (batch x query heads) * Sq * Sk * (Dq + Dv).

    Leading axes of any rank (batch, heads) are taken from the query (grouped-query keys/values
    broadcast over its heads), like torch's ``sdpa_flop_count`` for 4-D inputs.
    """
    lead = math.prod(query_shape[:-2])
    sq, dq = query_shape[-2], query_shape[-1]
    sk, dv = key_shape[-2], value_shape[-1]
    return 2 * lead * sq * sk * dq + 2 * lead * sq * sk * dv


def _register_cpu_attention_formula() -> bool:
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_registry:       # a later torch (or another library) counts it already
        return False

    @register_flop_formula(op)
    def _cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return attention_flops(query_shape, key_shape, value_shape)
    return True


CPU_ATTENTION_FORMULA_REGISTERED = _register_cpu_attention_formula()


@dataclass(frozen=True)
class TensorSpec:
    """Shape, strides, dtype and device of a tensor, without its memory."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, x: torch.Tensor) -> "TensorSpec":
        return cls(tuple(x.shape), tuple(x.stride()), x.dtype, x.device)


def spec_of(x):
    return TensorSpec.of(x) if isinstance(x, torch.Tensor) else x


def count_flops(gm, inputs: list) -> int:
    """FLOPs of one call of ``gm`` on inputs (tensors or TensorSpecs), without running any kernel."""
    specs = [spec_of(x) for x in inputs]
    with FakeTensorMode(allow_non_fake_inputs=True):
        fakes = [torch.empty_strided(s.shape, s.stride, dtype=s.dtype, device=s.device)
                 if isinstance(s, TensorSpec) else s for s in specs]
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            gm(*fakes)
    return int(fc.get_total_flops())


class LinearFlops:
    """flops(ks) for one variant; ``inputs_for(ks)`` builds its inputs."""

    def __init__(self, gm, inputs_for, sites: list[str]):
        ones = {s: 1 for s in sites}
        f0 = count_flops(gm, inputs_for(ones))
        self.per_token = {}
        for s in sites:
            ks = dict(ones)
            ks[s] = 2
            self.per_token[s] = count_flops(gm, inputs_for(ks)) - f0
        self.base = f0 - sum(self.per_token.values())

    def __call__(self, ks: dict[str, int]) -> int:
        return self.base + sum(self.per_token[s] * ks[s] for s in self.per_token)
