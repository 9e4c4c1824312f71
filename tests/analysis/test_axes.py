"""Unit tests of the token-axis rules in toca_fx/analysis/axes.py.

Every graph is exported from a tiny function with ``torch.export.export(..., strict=False)``
(ATen default IR, shapes in ``node.meta['val']``); the node of interest is handed to ``propagate``
with hand-built axes for its inputs. B, N, C = 2, 4, 8 unless a test says otherwise.

Each ``raise NotLocal`` in axes.py and the test that reaches it (refusal code; a message fragment
where one function raises one code from two places):

  _single_input   not-token-input          test_first_input_not_token_carrying[*] (every single-input rule)
  _out_ndim       no-shape                 test_broadcast_refuses_node_without_recorded_shape
  _broadcast      token-axes-differ        test_broadcast_refuses_tokens_on_different_axes
  _broadcast      token-size-mismatch      test_broadcast_refuses_other_size_on_token_axis (via aten.cat)
  _broadcast      per-token-no-batch       test_broadcast_refuses_per_token_input_without_batch
  _identity       no-shape                 test_native_dropout_refuses_outputs_not_shaped_like_input (tampered meta)
  _linear         contracts-token-axis     test_linear_refuses_tokens_on_last_axis
  _linear         token-dependent-weight   test_linear_refuses_token_dependent_weight
  _addmm          operand-no-tokens        test_addmm_refuses_matrix_operand_without_tokens
  _addmm          contracts-token-axis     test_addmm_refuses_tokens_on_columns
  _addmm          token-token-product      test_addmm_refuses_two_token_operands,
                                           test_addmm_refuses_token_matrix_times_itself,
                                           test_addmm_refuses_token_operand_reused_in_another_position
  _layer_norm     reduces-token-axis       test_layer_norm_refuses_token_axis_in_normalised_shape,
                                           test_layer_norm_refuses_batch_axis_in_normalised_shape
  _layer_norm     token-dependent-weight   test_layer_norm_refuses_token_dependent_weight
  _softmax        reduces-token-axis       test_softmax_refuses_token_and_batch_axis[*]
  _reduce         reduces-token-axis "all axes"             test_reduce_refuses_reduction_over_all_axes[*],
                                                            test_reduce_refuses_empty_dim_list,
                                                            test_reduce_refuses_empty_dim_lists_of_other_ops[*]
  _reduce         reduces-token-axis "token or batch axis"  test_reduce_refuses_token_or_batch_axis[*]
  _reshape        reshapes-merged-axis     test_reshape_refuses_other_reshape_of_merged_axis
  _reshape        reshapes-token-axis      test_reshape_refuses_merging_or_splitting_token_axis[*]
  _reshape        reshapes-batch-axis      test_reshape_refuses_merging_batch_axis,
                                           test_reshape_refuses_splitting_folded_batch_elsewhere
  _squeeze        removes-token-axis       test_squeeze_refuses_removing_token_axis,
                                           test_squeeze_refuses_inconsistent_output_rank (tampered meta)
  _split          splits-token-axis        test_split_refuses_token_or_batch_axis[*]
  _unbind         splits-token-axis        test_unbind_refuses_token_or_batch_axis[*]
  _slice          slices-token-axis        test_slice_refuses_token_or_batch_axis[*]
  _cat            concatenates-token-axis  test_cat_refuses_token_or_batch_axis[*]
  _stack          stacks-mixed             test_stack_refuses_mixed_inputs
  _stack          token-axes-differ        test_stack_refuses_tokens_on_different_axes
  _sdpa           queries-not-tokens "do not come from"     test_sdpa_refuses_queries_without_tokens
  _sdpa           queries-not-tokens "sequence axis"        test_sdpa_refuses_tokens_off_the_sequence_axis
  _sdpa           causal-attention         test_sdpa_refuses_causal_self_attention
  _sdpa           token-dependent-mask     test_sdpa_refuses_token_dependent_mask
  _matmul         operand-no-tokens        test_matmul_refuses_left_operand_without_tokens
  _matmul         contracts-token-axis     test_matmul_refuses_contracting_token_axis
  propagate       not-a-call               test_propagate_refuses_non_call_nodes
  propagate       merged-axis-op           test_propagate_refuses_merged_axis_into_other_ops
  propagate       batch-merged-op          test_propagate_refuses_arithmetic_on_a_folded_batch
  _sdpa           merged-axis-op           test_sdpa_on_batch_merged_queries_gathers_mask_rows_batch_major
  propagate       no-axis-rule             test_propagate_refuses_ops_without_rule

Codes are compared when the exception carries a ``refusal`` (the library's Refusal object); the
message always starts with the node's name.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from toca_fx.analysis import axes as A
from toca_fx.analysis.axes import RULES, Axes, AxisInfo, External, NotLocal, propagate

torch.set_num_threads(1)
aten = torch.ops.aten

B, N, C = 2, 4, 8
X = Axes(0, 1)                      # the stream's (B, N, C) axes
_TAKES_N_TOKENS = len(inspect.signature(propagate).parameters) >= 3


def prop(node, axes, n_tokens=N) -> AxisInfo:
    """propagate(node, axes[, n_tokens]) (n_tokens is gone from newer signatures)."""
    return propagate(node, axes, n_tokens) if _TAKES_N_TOKENS else propagate(node, axes)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def export(fn, *shapes):
    """(graph module, placeholders) of ``fn`` exported on random tensors of ``shapes``."""
    args = tuple(torch.randn(*s) if isinstance(s, tuple) else s for s in shapes)
    gm = torch.export.export(_Fn(fn), args, strict=False).graph_module
    return gm, [n for n in gm.graph.nodes if n.op == "placeholder"]


def calls(gm, packet=None):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and (packet is None or getattr(n.target, "overloadpacket", n.target) is packet)]


def one(gm, packet):
    found = calls(gm, packet)
    assert len(found) == 1, [n.format_node() for n in gm.graph.nodes]
    return found[0]


def refused(node, axes, code, fragment=None):
    with pytest.raises(NotLocal) as ei:
        prop(node, axes)
    exc = ei.value
    assert str(exc).startswith(f"{node.name}:")
    refusal = getattr(exc, "refusal", None)
    if refusal is not None:
        assert refusal.code == code
        assert refusal.node == node.name
    if fragment is not None:
        assert fragment in str(exc)
    return exc


def out_of(fn, shapes, in_axes, packet):
    """Export ``fn``, give its placeholders ``in_axes`` (None: not token-carrying), propagate the
    single ``packet`` node."""
    gm, ph = export(fn, *shapes)
    axes = {p: a for p, a in zip(ph, in_axes) if a is not None}
    return prop(one(gm, packet), axes), ph


# -- the data types and the registry ---------------------------------------------------------

def test_axes_and_axisinfo_defaults():
    a = Axes(0, 1)
    assert (a.batch, a.token, a.merged) == (0, 1, None)
    assert a == Axes(0, 1, None) and a != Axes(0, 1, 2) and hash(a) == hash(Axes(0, 1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.token = 2
    i1, i2 = AxisInfo(a), AxisInfo(None)
    assert i1.mixing_inputs == [] and i1.external == [] and i2.out is None
    i1.mixing_inputs.append("k")
    assert i2.mixing_inputs == []          # default_factory: no shared list between instances


def test_external_fields():
    gm, (x,) = export(lambda x: x + 1, (B, N, C))
    e = External(x, Axes(None, 0), 3, 0)
    assert (e.node, e.axes, e.out_ndim, e.out_batch) == (x, Axes(None, 0), 3, 0)
    assert e == External(x, Axes(None, 0), 3, 0) and e != External(x, Axes(0, 1), 3, 0)


EXPECTED_RULES = {
    "_identity": [aten.dropout, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
                  aten.type_as, aten.lift_fresh_copy, aten.native_dropout],
    "_linear": [aten.linear],
    "_addmm": [aten.addmm, aten.mm],
    "_layer_norm": [aten.layer_norm, aten.rms_norm],
    "_softmax": [aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum],
    "_reduce": [aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.linalg_vector_norm, aten.norm],
    "_reshape": [aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten],
    "_transpose": [aten.transpose],
    "_permute": [aten.permute],
    "_unsqueeze": [aten.unsqueeze],
    "_squeeze": [aten.squeeze],
    "_expand": [aten.expand],
    "_split": [aten.chunk, aten.split, aten.split_with_sizes, aten.unsafe_split, aten.unsafe_chunk],
    "_unbind": [aten.unbind],
    "_slice": [aten.slice, aten.narrow, aten.select],
    "_cat": [aten.cat],
    "_stack": [aten.stack],
    "_sdpa": [aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu],
    "_matmul": [aten.matmul, aten.bmm],
    "_getitem": [operator.getitem],
}


def test_rules_registry_maps_each_packet_to_its_rule():
    expected = {p: getattr(A, name) for name, packets in EXPECTED_RULES.items() for p in packets}
    for p, fn in expected.items():
        assert RULES.get(p) is fn, p
    # pointwise ops are not registered: they share the broadcasting rule through their tag
    assert aten.add not in RULES and aten.gelu not in RULES
    assert torch.Tag.pointwise in aten.gelu.default.tags


# -- propagate: dispatch -----------------------------------------------------------------------

def test_propagate_uses_pointwise_tag_for_unregistered_ops():
    info, _ = out_of(lambda x: F.gelu(x), [(B, N, C)], [X], aten.gelu)
    assert info == AxisInfo(X)


def test_propagate_refuses_non_call_nodes():
    gm, (x,) = export(lambda x: x * 2, (B, N, C))
    refused(x, {}, "not-a-call")
    refused(gm.graph.output_node(), {x: X}, "not-a-call")


def test_propagate_refuses_ops_without_rule():
    gm, (x,) = export(lambda x: torch.flip(x, [2]), (B, N, C))
    node = one(gm, aten.flip)
    assert aten.flip not in RULES and torch.Tag.pointwise not in node.target.tags
    refused(node, {x: X}, "no-axis-rule")


def test_propagate_lets_merged_axis_into_pointwise_and_listed_ops():
    m = Axes(None, 0, B)
    gm, (y, w) = export(lambda y, w: F.linear(F.gelu(y), w), (B * N, C), (C, C))
    gelu, lin = one(gm, aten.gelu), one(gm, aten.linear)
    assert prop(gelu, {y: m}) == AxisInfo(m)
    assert prop(lin, {gelu: m}) == AxisInfo(m)


def test_propagate_refuses_merged_axis_into_other_ops():
    gm, (y,) = export(lambda y: y.softmax(-1), (B * N, C))
    node = one(gm, aten.softmax)
    assert prop(node, {y: Axes(None, 0)}) == AxisInfo(Axes(None, 0))   # the same op, axis not merged
    refused(node, {y: Axes(None, 0, B)}, "merged-axis-op")


# -- _single_input: every single-input rule refuses a first input without tokens ---------------

SINGLE_INPUT = [
    ("identity", lambda x, t: x.clone() * t.sum(), aten.clone),
    ("type_as", lambda x, t: x.type_as(t), aten.type_as),
    ("linear", lambda x, t: F.linear(x, torch.ones(C, C)) + t, aten.linear),
    ("layer_norm", lambda x, t: F.layer_norm(x, (C,)) + t, aten.layer_norm),
    ("softmax", lambda x, t: x.softmax(-1) + t, aten.softmax),
    ("reduce", lambda x, t: x.mean(-1, keepdim=True) + t, aten.mean),
    ("reshape", lambda x, t: x.reshape(B, N, 2, 4), aten.reshape),
    ("transpose", lambda x, t: x.transpose(1, 2), aten.transpose),
    ("permute", lambda x, t: x.permute(0, 2, 1), aten.permute),
    ("unsqueeze", lambda x, t: x.unsqueeze(1), aten.unsqueeze),
    ("squeeze", lambda x, t: x.unsqueeze(1).squeeze(1), aten.squeeze),
    ("expand", lambda x, t: x.expand(B, N, C), aten.expand),
    ("split", lambda x, t: x.chunk(2, -1), aten.chunk),
    ("unbind", lambda x, t: x.unbind(2), aten.unbind),
    ("slice", lambda x, t: x[..., 1:3], aten.slice),
    ("getitem", lambda x, t: x.chunk(2, -1)[0], operator.getitem),
]


@pytest.mark.parametrize("name,fn,packet", SINGLE_INPUT, ids=[s[0] for s in SINGLE_INPUT])
def test_first_input_not_token_carrying(name, fn, packet):
    gm, (x, t) = export(fn, (B, N, C), (B, N, C))
    node = calls(gm, packet)[0]
    # the node's first input is x (or derived from x only), and only t carries tokens
    refused(node, {t: X}, "not-token-input")


# -- _broadcast / _pointwise -------------------------------------------------------------------

def test_broadcast_keeps_axes_through_bias():
    info, _ = out_of(lambda x, b: x + b, [(B, N, C), (C,)], [X, None], aten.add)
    assert info == AxisInfo(X)                 # the bias has no token axis: not an external input


def test_broadcast_takes_batch_from_the_input_that_has_one():
    # a batch-less (N, C) token table and the (B, N, C) stream, in both orders
    for fn in (lambda t, x: t * x, lambda t, x: x * t):
        info, _ = out_of(fn, [(N, C), (B, N, C)], [Axes(None, 0), X], aten.mul)
        assert info == AxisInfo(X)


def test_broadcast_offsets_lower_rank_token_input():
    # a batch-less (N, C) token table against a per-sample (B, 1, C) gate: tokens move to axis 1
    info, _ = out_of(lambda t, g: t * g, [(N, C), (B, 1, C)], [Axes(None, 0), None], aten.mul)
    assert info == AxisInfo(Axes(None, 1))


def test_broadcast_without_token_inputs_is_not_token_carrying():
    info, _ = out_of(lambda a, b: a + b, [(B, N, C), (B, N, C)], [None, None], aten.add)
    assert info == AxisInfo(None)


def test_broadcast_size_one_token_axis_is_not_external():
    info, _ = out_of(lambda x, g: x * g, [(B, N, C), (B, 1, C)], [X, None], aten.mul)
    assert info == AxisInfo(X)


@pytest.mark.parametrize("shape,expect_axes", [
    ((B, N, C), Axes(0, 1)),          # one row per sample and token
    ((1, N, C), Axes(None, 1)),       # broadcast over the batch: expanded before the gather
    ((N, C), Axes(None, 0)),          # a positional table without a batch axis
])
def test_broadcast_reports_per_token_inputs_as_external(shape, expect_axes):
    info, (x, pos) = out_of(lambda x, p: x + p, [(B, N, C), shape], [X, None], aten.add)
    assert info.out == X and info.mixing_inputs == []
    assert info.external == [External(pos, expect_axes, 3, 0)]


def test_broadcast_refuses_tokens_on_different_axes():
    gm, (x, y) = export(lambda x, y: x + y, (B, N, N), (B, N, N))
    node = one(gm, aten.add)
    assert prop(node, {x: X, y: X}) == AxisInfo(X)
    refused(node, {x: X, y: Axes(0, 2)}, "token-axes-differ")


def test_broadcast_refuses_other_size_on_token_axis():
    # aten.cat broadcasts its inputs' axes: a non-token input with 3 rows on the token axis
    gm, (x, e) = export(lambda x, e: torch.cat([x, e], 1), (B, N, C), (B, 3, C))
    exc = refused(one(gm, aten.cat), {x: X}, "token-size-mismatch")
    assert e.name in str(exc)


def test_broadcast_refuses_per_token_input_without_batch():
    gm, (t, p) = export(lambda t, p: t + p, (N, C), (N, C))
    node = one(gm, aten.add)
    assert prop(node, {t: Axes(None, 0), p: Axes(None, 0)}) == AxisInfo(Axes(None, 0))
    refused(node, {t: Axes(None, 0)}, "per-token-no-batch")


def test_broadcast_refuses_node_without_recorded_shape():
    gm, (x,) = export(lambda x: x * 2, (B, N, C))
    node = one(gm, aten.mul)
    assert prop(node, {x: X}) == AxisInfo(X)
    del node.meta["val"]
    refused(node, {x: X}, "no-shape")


def test_pointwise_keeps_merged_axis_and_batchless_axes():
    info, _ = out_of(lambda y: F.silu(y), [(B * N, C)], [Axes(None, 0, B)], aten.silu)
    assert info == AxisInfo(Axes(None, 0, B))
    info, _ = out_of(lambda t: t * 3.0, [(N, C)], [Axes(None, 0)], aten.mul)
    assert info == AxisInfo(Axes(None, 0))


# -- _identity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,packet", [
    (lambda x: x.clone(), aten.clone),
    (lambda x: x.to(torch.float64), aten.to),
    (lambda x: F.dropout(x, 0.1, training=False), aten.dropout),
    (lambda x: x.detach(), aten.detach),
], ids=["clone", "to", "dropout", "detach"])
def test_identity_keeps_axes(fn, packet):
    info, _ = out_of(fn, [(B, N, C)], [Axes(1, 2)], packet)
    assert info == AxisInfo(Axes(1, 2))


def test_identity_keeps_merged_axis():
    info, _ = out_of(lambda y: y.clone(), [(B * N, C)], [Axes(None, 0, B)], aten.clone)
    assert info == AxisInfo(Axes(None, 0, B))


def test_type_as_follows_first_input():
    info, _ = out_of(lambda x, r: x.type_as(r), [(B, N, C), (B, N, C)], [X, None], aten.type_as)
    assert info == AxisInfo(X)


def test_native_dropout_is_identity():
    info, _ = out_of(lambda x: torch.ops.aten.native_dropout(x, 0.1, False)[0], [(B, N, C)], [X],
                     aten.native_dropout)
    assert info.out == X


def test_native_dropout_refuses_outputs_not_shaped_like_input():
    gm, (x,) = export(lambda x: torch.ops.aten.native_dropout(x, 0.1, False)[0], (B, N, C))
    node = one(gm, aten.native_dropout)
    out, mask = node.meta["val"]
    node.meta["val"] = (out, mask[..., :1])
    refused(node, {x: X}, "no-shape", "shaped like the input")

def test_native_dropout_mask_and_merged_axis():
    # both outputs (value, mask) are shaped like the input and carry its axes
    gm, (x,) = export(lambda x: torch.ops.aten.native_dropout(x, 0.1, True)[1], (B, N, C))
    node = one(gm, aten.native_dropout)
    assert prop(node, {x: X}) == AxisInfo(X)
    mask = [n for n in calls(gm, operator.getitem) if n.args[0] is node and n.args[1] == 1]
    assert len(mask) == 1 and prop(mask[0], {node: X}) == AxisInfo(X)
    gm, (y,) = export(lambda y: torch.ops.aten.native_dropout(y, 0.1, False)[0], (B * N, C))
    assert prop(one(gm, aten.native_dropout), {y: Axes(None, 0, B)}) == AxisInfo(Axes(None, 0, B))


# -- _linear -----------------------------------------------------------------------------------

def test_linear_keeps_axes():
    info, _ = out_of(lambda x, w, b: F.linear(x, w, b), [(B, N, C), (5, C), (5,)], [X, None, None], aten.linear)
    assert info == AxisInfo(X)
    info, _ = out_of(lambda y, w: F.linear(y, w), [(B * N, C), (5, C)], [Axes(None, 0, B), None], aten.linear)
    assert info == AxisInfo(Axes(None, 0, B))


def test_linear_refuses_tokens_on_last_axis():
    gm, (x, w) = export(lambda x, w: F.linear(x, w), (B, C, N), (5, N))
    node = one(gm, aten.linear)
    refused(node, {x: Axes(0, 2)}, "contracts-token-axis")


def test_linear_refuses_token_dependent_weight():
    gm, (x, w) = export(lambda x, w: F.linear(x, w), (B, N, C), (C, C))
    node = one(gm, aten.linear)
    refused(node, {x: X, w: Axes(None, 0)}, "token-dependent-weight")


# -- _addmm ------------------------------------------------------------------------------------

def test_addmm_and_mm_keep_the_flattened_axis():
    m = Axes(None, 0, B)
    info, _ = out_of(lambda b, y, w: torch.addmm(b, y, w), [(5,), (B * N, C), (C, 5)], [None, m, None], aten.addmm)
    assert info == AxisInfo(m)
    info, _ = out_of(lambda y, w: torch.mm(y, w), [(B * N, C), (C, 5)], [m, None], aten.mm)
    assert info == AxisInfo(m)


def test_addmm_refuses_matrix_operand_without_tokens():
    gm, (b, w, y) = export(lambda b, w, y: torch.addmm(b, w, y), (C,), (5, B * N), (B * N, C))
    refused(one(gm, aten.addmm), {y: Axes(None, 0, B)}, "operand-no-tokens")
    gm, (w, y) = export(lambda w, y: torch.mm(w, y), (5, B * N), (B * N, C))
    refused(one(gm, aten.mm), {y: Axes(None, 0, B)}, "operand-no-tokens")


def test_addmm_refuses_tokens_on_columns():
    gm, (y, w) = export(lambda y, w: torch.mm(y, w), (C, N), (N, 5))
    refused(one(gm, aten.mm), {y: Axes(None, 1)}, "contracts-token-axis")


def test_addmm_refuses_two_token_operands():
    gm, (b, y, w) = export(lambda b, y, w: torch.addmm(b, y, w), (N, C), (N, C), (C, C))
    node = one(gm, aten.addmm)
    assert prop(node, {y: Axes(None, 0)}) == AxisInfo(Axes(None, 0))
    refused(node, {y: Axes(None, 0), b: Axes(None, 0)}, "token-token-product")
    refused(node, {y: Axes(None, 0), w: Axes(None, 0)}, "token-token-product")


def test_addmm_refuses_token_matrix_times_itself():
    gm, (y,) = export(lambda y: torch.mm(y, y), (N, N))
    with pytest.raises(NotLocal):
        prop(one(gm, aten.mm), {y: Axes(None, 0)})


def test_addmm_refuses_token_operand_reused_in_another_position():
    gm, (y,) = export(lambda y: torch.mm(y, y), (N, N))
    refused(one(gm, aten.mm), {y: Axes(None, 0)}, "token-token-product")
    gm, (y, w) = export(lambda y, w: torch.addmm(y, y, w), (N, N), (N, N))
    refused(one(gm, aten.addmm), {y: Axes(None, 0)}, "token-token-product")


# -- _layer_norm -------------------------------------------------------------------------------

def test_layer_norm_and_rms_norm_keep_axes():
    info, _ = out_of(lambda x, w, b: F.layer_norm(x, (C,), w, b), [(B, N, C), (C,), (C,)], [X, None, None],
                     aten.layer_norm)
    assert info == AxisInfo(X)
    info, _ = out_of(lambda x, w: F.rms_norm(x, (C,), w), [(B, N, C), (C,)], [X, None], aten.rms_norm)
    assert info == AxisInfo(X)
    # normalising over the two trailing axes of a (B, N, H, D) tensor is fine too
    info, _ = out_of(lambda x: F.layer_norm(x, (2, 4)), [(B, N, 2, 4)], [X], aten.layer_norm)
    assert info == AxisInfo(X)


def test_layer_norm_refuses_token_axis_in_normalised_shape():
    gm, (x,) = export(lambda x: F.layer_norm(x, (N, C)), (B, N, C))
    refused(one(gm, aten.layer_norm), {x: X}, "reduces-token-axis")


def test_layer_norm_refuses_batch_axis_in_normalised_shape():
    gm, (x,) = export(lambda x: F.layer_norm(x, (B, C)), (N, B, C))     # token-major (N, B, C)
    refused(one(gm, aten.layer_norm), {x: Axes(1, 0)}, "reduces-token-axis")


def test_layer_norm_refuses_token_dependent_weight():
    gm, (x, w) = export(lambda x, w: F.layer_norm(x, (C,), w), (B, C, C), (C,))
    refused(one(gm, aten.layer_norm), {x: X, w: Axes(None, 0)}, "token-dependent-weight")


# -- _softmax ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,packet", [
    (lambda x: x.softmax(-1), aten.softmax),
    (lambda x: x.log_softmax(2), aten.log_softmax),
    (lambda x: x.cumsum(-1), aten.cumsum),
], ids=["softmax", "log_softmax", "cumsum"])
def test_softmax_over_channels_keeps_axes(fn, packet):
    info, _ = out_of(fn, [(B, N, C)], [X], packet)
    assert info == AxisInfo(X)


@pytest.mark.parametrize("fn,packet", [
    (lambda x: x.softmax(1), aten.softmax),
    (lambda x: x.softmax(-3), aten.softmax),
    (lambda x: x.cumsum(1), aten.cumsum),
], ids=["softmax-token", "softmax-batch", "cumsum-token"])
def test_softmax_refuses_token_and_batch_axis(fn, packet):
    gm, (x,) = export(fn, (B, N, C))
    refused(one(gm, packet), {x: X}, "reduces-token-axis")


# -- _reduce -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,packet,expect", [
    (lambda x: x.mean(-1, keepdim=True), aten.mean, Axes(0, 2)),
    (lambda x: x.sum(1), aten.sum, Axes(0, 1)),               # the reduced axis lies before the tokens
    (lambda x: x.sum(-1), aten.sum, Axes(0, 2)),              # after the tokens: nothing shifts
    (lambda x: x.amax(1, keepdim=True), aten.amax, Axes(0, 2)),
    (lambda x: x.amin(1), aten.amin, Axes(0, 1)),
    (lambda x: x.var(1), aten.var, Axes(0, 1)),
    (lambda x: x.std(1, keepdim=True), aten.std, Axes(0, 2)),
    (lambda x: torch.var(x, 1, correction=0, keepdim=True), aten.var, Axes(0, 2)),
    (lambda x: torch.linalg.vector_norm(x, dim=1), aten.linalg_vector_norm, Axes(0, 1)),
    (lambda x: torch.linalg.vector_norm(x, dim=1, keepdim=True), aten.linalg_vector_norm, Axes(0, 2)),
    (lambda x: torch.ops.aten.norm.ScalarOpt_dim(x, 2, [1]), aten.norm, Axes(0, 1)),
    (lambda x: torch.ops.aten.norm.ScalarOpt_dim(x, 2, [1], True), aten.norm, Axes(0, 2)),
], ids=["mean-keep", "sum-before", "sum-after", "amax-keep", "amin", "var", "std-keep", "var-correction-keep",
        "vector-norm", "vector-norm-keep", "norm", "norm-keep"])
def test_reduce_over_channels(fn, packet, expect):
    # (B, C, N, D): tokens on axis 2, channels on axis 1 (before) and 3 (after)
    info, _ = out_of(fn, [(B, C, N, 3)], [Axes(0, 2)], packet)
    assert info == AxisInfo(expect)


@pytest.mark.parametrize("fn,packet", [
    (lambda x: x.sum(), aten.sum),
    (lambda x: x.mean(), aten.mean),
    (lambda x: x.amax(), aten.amax),
    (lambda x: torch.linalg.vector_norm(x), aten.linalg_vector_norm),
], ids=["sum", "mean", "amax", "vector-norm"])
def test_reduce_refuses_reduction_over_all_axes(fn, packet):
    gm, (x,) = export(fn, (B, N, C))
    refused(one(gm, packet), {x: X}, "reduces-token-axis", "all axes")


@pytest.mark.parametrize("fn,packet", [
    (lambda x: x.mean(1), aten.mean),
    (lambda x: x.sum([0, 2]), aten.sum),
    (lambda x: x.var(-2), aten.var),
    (lambda x: torch.linalg.vector_norm(x, dim=1), aten.linalg_vector_norm),
], ids=["mean-token", "sum-batch", "var-token", "vector-norm-token"])
def test_reduce_refuses_token_or_batch_axis(fn, packet):
    gm, (x,) = export(fn, (B, N, C))
    refused(one(gm, packet), {x: X}, "reduces-token-axis", "token or batch axis")


def test_reduce_var_dim_reads_keepdim_not_unbiased():
    gm, (x,) = export(lambda x: x.var(1, unbiased=False, keepdim=True), (B, C, N))
    node = one(gm, aten.var)
    assert node.args[2:] == (False, True)
    assert tuple(node.meta["val"].shape) == (B, 1, N)
    assert prop(node, {x: Axes(0, 2)}) == AxisInfo(Axes(0, 2))


def test_reduce_refuses_empty_dim_list():
    gm, (x,) = export(lambda x: x.sum(dim=[]), (B, N, C))
    node = one(gm, aten.sum)
    assert node.args[1] == [] and tuple(node.meta["val"].shape) == ()
    with pytest.raises(NotLocal):
        prop(node, {x: X})


@pytest.mark.parametrize("fn,packet,in_axes,expect", [
    (lambda x: x.std(1, unbiased=True, keepdim=True), aten.std, Axes(0, 2), Axes(0, 2)),      # std.dim
    (lambda x: x.var(1, unbiased=True), aten.var, Axes(0, 2), Axes(0, 1)),                     # keepdim default
    (lambda x: x.var(1, correction=0, keepdim=True), aten.var, Axes(0, 2), Axes(0, 2)),        # var.correction
    (lambda x: x.std(1, correction=1, keepdim=False), aten.std, Axes(0, 2), Axes(0, 1)),       # std.correction
    (lambda x: aten.norm.ScalarOpt_dim(x, 2, [1], True), aten.norm, Axes(0, 2), Axes(0, 2)),   # (self, p, dim, keepdim)
    (lambda x: torch.linalg.vector_norm(x, 2, 1, True), aten.linalg_vector_norm, Axes(0, 2), Axes(0, 2)),
], ids=["std-dim", "var-dim-default", "var-correction", "std-correction", "norm", "vector-norm"])
def test_reduce_reads_keepdim_by_schema_name(fn, packet, in_axes, expect):
    gm, (x,) = export(fn, (B, C, N))
    node = one(gm, packet)
    assert prop(node, {x: in_axes}) == AxisInfo(expect)
    assert len(node.meta["val"].shape) == (3 if expect == in_axes else 2)


@pytest.mark.parametrize("fn,packet", [
    (lambda x: x.amax(), aten.amax),                   # amax's dim defaults to []
    (lambda x: x.amin(dim=[]), aten.amin),
    (lambda x: x.mean(dim=[], keepdim=True), aten.mean),
], ids=["amax-default", "amin-empty", "mean-empty-keepdim"])
def test_reduce_refuses_empty_dim_lists_of_other_ops(fn, packet):
    gm, (x,) = export(fn, (B, N, C))
    refused(one(gm, packet), {x: X}, "reduces-token-axis", "all axes")


# -- _reshape ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,packet,expect", [
    (lambda x: x.view(B, N, 2, 4), aten.view, Axes(0, 1)),
    (lambda x: x.reshape(B, N, 2, 2, 2), aten.reshape, Axes(0, 1)),
    (lambda x: x.unflatten(2, (2, 4)), aten.unflatten, Axes(0, 1)),
    (lambda x: x.view(B, N, 2, 4).flatten(2, 3), aten.flatten, Axes(0, 1)),
], ids=["view", "reshape", "unflatten", "flatten"])
def test_reshape_of_channels_keeps_axes(fn, packet, expect):
    gm, (x,) = export(fn, (B, N, C))
    node = one(gm, packet)
    src = node.args[0]
    assert prop(node, {src: X}) == AxisInfo(expect)


def test_reshape_refuses_splitting_the_batch_axis_but_moves_batchless_tokens():
    # (B*F, N, C) -> (B, F, N, C): a frames axis folded into the batch is split off; tokens move to 2
    gm, (x,) = export(lambda x: x.view(B, 3, N, C), (B * 3, N, C))
    refused(one(gm, aten.view), {x: X}, "reshapes-batch-axis")
    assert prop(one(gm, aten.view), {x: Axes(None, 1)}) == AxisInfo(Axes(None, 2))


@pytest.mark.parametrize("fn,packet", [
    (lambda x: x.view(-1, C), aten.view),
    (lambda x: x.flatten(0, 1), aten.flatten),
    (lambda x: x.reshape(B * N, 2, 4), aten.reshape),
], ids=["view", "flatten", "reshape-3d"])
def test_reshape_merges_batch_and_tokens(fn, packet):
    gm, (x,) = export(fn, (B, N, C))
    assert prop(one(gm, packet), {x: X}) == AxisInfo(Axes(None, 0, B))


def test_reshape_merges_batch_and_tokens_behind_a_leading_axis():
    # (H, B, N, D) -> (H, B*N, D)
    gm, (x,) = export(lambda x: x.reshape(3, B * N, C), (3, B, N, C))
    assert prop(one(gm, aten.reshape), {x: Axes(1, 2)}) == AxisInfo(Axes(None, 1, B))


def test_reshape_splits_the_merged_axis_back():
    gm, (y,) = export(lambda y: y.view(B, N, C), (B * N, C))
    assert prop(one(gm, aten.view), {y: Axes(None, 0, B)}) == AxisInfo(Axes(0, 1))
    gm, (y,) = export(lambda y: y.view(B, N, 2, 4), (B * N, C))
    assert prop(one(gm, aten.view), {y: Axes(None, 0, B)}) == AxisInfo(Axes(0, 1))


def test_reshape_keeps_the_merged_axis_through_channel_reshapes():
    gm, (y,) = export(lambda y: y.view(B * N, 2, 4), (B * N, C))
    assert prop(one(gm, aten.view), {y: Axes(None, 0, B)}) == AxisInfo(Axes(None, 0, B))


def test_gpt2_style_round_trip():
    # view(-1, C) -> addmm -> view(B, N, C'): GPT-2's Conv1D
    gm, (x, w, b) = export(lambda x, w, b: torch.addmm(b, x.view(-1, C), w).view(B, N, 5), (B, N, C), (C, 5), (5,))
    axes = {x: X}
    for node in calls(gm):
        info = prop(node, axes)
        axes[node] = info.out
    v1, mm, v2 = calls(gm, aten.view)[0], one(gm, aten.addmm), calls(gm, aten.view)[1]
    assert (axes[v1], axes[mm], axes[v2]) == (Axes(None, 0, B), Axes(None, 0, B), X)


def test_reshape_refuses_other_reshape_of_merged_axis():
    gm, (y,) = export(lambda y: y.view(N, B * C), (B * N, C))
    refused(one(gm, aten.view), {y: Axes(None, 0, B)}, "reshapes-merged-axis")


@pytest.mark.parametrize("fn,shape", [
    (lambda x: x.view(B, N * C), (B, N, C)),         # tokens merged with channels
    (lambda x: x.view(B, 2, 2 * C), (B, N, C)),      # token axis split
], ids=["merge", "split"])
def test_reshape_refuses_merging_or_splitting_token_axis(fn, shape):
    gm, (x,) = export(fn, shape)
    refused(one(gm, aten.view), {x: X}, "reshapes-token-axis")


def test_reshape_refuses_merging_batch_axis():
    # (2, B, N, C) -> (2*B, N, C): the batch merges with the axis before it (not batch-major)
    gm, (x,) = export(lambda x: x.view(2 * B, N, C), (2, B, N, C))
    refused(one(gm, aten.view), {x: Axes(1, 2)}, "reshapes-batch-axis", "merges the batch axis")


def test_reshape_folds_heads_into_the_batch_and_back():
    # sequence-first (N, B, C) -> (N, B*2, C/2) (nn.MultiheadAttention's heads folded into the batch):
    # the batch axis holds (B x heads), batch-major; (B*2, N, C/2) -> (B, 2, N, C/2) splits it back
    gm, (x,) = export(lambda x: x.view(N, B * 2, C // 2).transpose(0, 1).reshape(B, 2, N, C // 2), (N, B, C))
    view, = calls(gm, aten.view)
    folded = prop(view, {x: Axes(1, 0)}).out
    assert folded == Axes(1, 0, batch_merged=B)
    tr = one(gm, aten.transpose)
    assert prop(tr, {view: folded}).out == Axes(0, 1, batch_merged=B)
    back = [n for n in calls(gm) if n not in (view, tr)][-1]
    assert prop(back, {tr: Axes(0, 1, batch_merged=B)}).out == Axes(0, 2)


def test_reshape_refuses_splitting_folded_batch_elsewhere():
    # (B*4, N, C/4) -> (4, B, N, C/4): the outer factor is not the batch
    gm, (x,) = export(lambda x: x.view(4, B, N, C // 4), (B * 4, N, C // 4))
    refused(one(gm, aten.view), {x: Axes(0, 1, batch_merged=B)}, "reshapes-batch-axis", "flattened batch x heads")


def test_propagate_refuses_arithmetic_on_a_folded_batch():
    # a softmax (or any op other than a layout move) on (B x heads) rows would need to know the samples
    gm, (x,) = export(lambda x: torch.softmax(x, -1), (B * 2, N, C))
    refused(one(gm, aten.softmax), {x: Axes(0, 1, batch_merged=B)}, "batch-merged-op")


def test_reshape_merges_tokens_and_batch_token_major_and_splits_back():
    # sequence-first (N, B, H, d) -> (N*B, C): tokens outer, batch inner; (N*B, C) -> (N, B, C) splits it
    gm, (x,) = export(lambda x: x.reshape(N * B, C).view(N, B, C), (N, B, 2, C // 2))
    merge, split = calls(gm)
    m = prop(merge, {x: Axes(1, 0)}).out
    assert m == Axes(None, 0, B, token_major=True)
    assert prop(split, {merge: m}).out == Axes(1, 0)


def test_transpose_keeps_a_merged_token_axis():
    gm, (x,) = export(lambda x: x.transpose(1, 2), (1, B * N, 2, C))
    assert prop(one(gm, aten.transpose), {x: Axes(None, 1, B)}).out == Axes(None, 2, B)


def test_sdpa_on_batch_merged_queries_gathers_mask_rows_batch_major():
    # queries of all samples as one sequence (1, H, B*N, d) with a (B*N, B*L) block-diagonal mask
    L = 3
    gm, (q, k, v, m) = export(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                              (1, 2, B * N, C), (1, 2, B * L, C), (1, 2, B * L, C),
                              torch.ones(B * N, B * L, dtype=torch.bool))
    info = prop(one(gm, aten.scaled_dot_product_attention), {q: Axes(None, 2, B)})
    assert info.out == Axes(None, 2, B) and info.mixing_inputs == []
    assert [(e.node, e.axes) for e in info.external] == [(m, Axes(None, 0, B))]
    # token-major flattened queries: the mask rows cannot be gathered per sample
    refused(one(gm, aten.scaled_dot_product_attention), {q: Axes(None, 2, B, token_major=True)}, "merged-axis-op")


def test_reshape_merges_batch_of_one_and_tokens():
    gm, (x,) = export(lambda x: x.view(-1, C), (1, N, C))
    info = prop(one(gm, aten.view), {x: X})
    assert info.out.batch is None and info.out.token == 0


def test_reshape_batch_of_one_round_trip():
    # GPT-2's Conv1D at batch 1: (1, N, C) -> (N, C) -> addmm -> (1, N, 5)
    gm, (x, b, w) = export(lambda x, b, w: torch.addmm(b, x.view(-1, C), w).view(1, N, 5), (1, N, C), (5,), (C, 5))
    v1, v2 = calls(gm, aten.view)
    m = Axes(None, 0, 1)
    assert prop(v1, {x: X}) == AxisInfo(m)
    mm = one(gm, aten.addmm)
    assert prop(mm, {v1: m}) == AxisInfo(m)
    assert prop(v2, {mm: m}) == AxisInfo(X)
    # a reshape that keeps the size-1 batch axis is not a merge
    gm, (x,) = export(lambda x: x.view(1, N, 2, C // 2), (1, N, C))
    assert prop(one(gm, aten.view), {x: X}) == AxisInfo(X)


# -- _transpose / _permute / _unsqueeze / _squeeze / _expand -----------------------------------

@pytest.mark.parametrize("dims,in_axes,expect", [
    ((1, 2), Axes(0, 1), Axes(0, 2)),
    ((-1, -2), Axes(0, 2), Axes(0, 3)),
    ((0, 1), Axes(0, 1), Axes(1, 0)),
    ((2, 3), Axes(0, 1), Axes(0, 1)),
    ((0, 3), Axes(None, 2), Axes(None, 2)),
], ids=["swap-token", "negative-dims", "swap-batch-token", "other-axes", "no-batch"])
def test_transpose(dims, in_axes, expect):
    info, _ = out_of(lambda x: x.transpose(*dims), [(B, N, 3, 5)], [in_axes], aten.transpose)
    assert info == AxisInfo(expect)


@pytest.mark.parametrize("perm,in_axes,expect", [
    ((0, 2, 1, 3), Axes(0, 1), Axes(0, 2)),
    ((2, 0, 3, 1), Axes(0, 3), Axes(1, 2)),
    ((0, -1, -3, -2), Axes(0, 1), Axes(0, 2)),
    ((3, 2, 1, 0), Axes(None, 1), Axes(None, 2)),
], ids=["heads", "mixed", "negative", "no-batch"])
def test_permute(perm, in_axes, expect):
    info, _ = out_of(lambda x: x.permute(*perm), [(B, N, 3, 5)], [in_axes], aten.permute)
    assert info == AxisInfo(expect)


@pytest.mark.parametrize("dim,expect", [(0, Axes(1, 2)), (1, Axes(0, 2)), (2, Axes(0, 1)), (-1, Axes(0, 1)),
                                        (-3, Axes(0, 2))])
def test_unsqueeze(dim, expect):
    info, _ = out_of(lambda x: x.unsqueeze(dim), [(B, N, C)], [X], aten.unsqueeze)
    assert info == AxisInfo(expect)


@pytest.mark.parametrize("fn,shape,in_axes,expect", [
    (lambda x: x.squeeze(2), (B, N, 1, C), Axes(0, 1), Axes(0, 1)),
    (lambda x: x.squeeze(1), (B, 1, N, C), Axes(0, 2), Axes(0, 1)),
    (lambda x: x.squeeze(), (B, 1, N, 1, C), Axes(0, 2), Axes(0, 1)),
    (lambda x: x.squeeze((1, 3)), (B, 1, N, 1, C), Axes(0, 2), Axes(0, 1)),
    (lambda x: x.squeeze(0), (1, N, C), Axes(0, 1), Axes(None, 0)),      # a batch of one squeezed away
    (lambda x: x.squeeze(2), (B, N, C), Axes(0, 1), Axes(0, 1)),         # not of size 1: nothing removed
], ids=["after", "before", "all", "dims", "batch-of-one", "no-op"])
def test_squeeze(fn, shape, in_axes, expect):
    info, _ = out_of(fn, [shape], [in_axes], aten.squeeze)
    assert info == AxisInfo(expect)


def test_squeeze_refuses_removing_token_axis():
    gm, (x,) = export(lambda x: x.squeeze(1), (B, 1, C))
    refused(one(gm, aten.squeeze), {x: X}, "removes-token-axis")
    gm, (x,) = export(lambda x: x.squeeze(), (B, 1, C))
    refused(one(gm, aten.squeeze), {x: X}, "removes-token-axis")


def test_squeeze_refuses_inconsistent_output_rank():
    # the second condition (kept axes != output rank) cannot arise from consistent metadata:
    # the recorded output value is replaced by one of another rank
    gm, (x,) = export(lambda x: x.squeeze(2), (B, N, 1, C))
    node = one(gm, aten.squeeze)
    node.meta["val"] = torch.empty(B, N, 1, C)
    refused(node, {x: X}, "removes-token-axis")


@pytest.mark.parametrize("fn,shape,in_axes,expect", [
    (lambda t: t.expand(B, N, C), (N, C), Axes(None, 0), Axes(None, 1)),
    (lambda x: x.expand(B, N, C), (1, N, C), Axes(0, 1), Axes(0, 1)),
    (lambda x: x.expand(3, B, N, C), (B, N, C), Axes(0, 1), Axes(1, 2)),
    (lambda x: x.expand(-1, -1, C), (B, N, 1), Axes(0, 1), Axes(0, 1)),
], ids=["table", "batch-of-one", "new-leading-axis", "channels"])
def test_expand(fn, shape, in_axes, expect):
    info, _ = out_of(fn, [shape], [in_axes], aten.expand)
    assert info == AxisInfo(expect)


# -- _split / _unbind / _getitem ---------------------------------------------------------------

@pytest.mark.parametrize("fn,packet", [
    (lambda x: x.chunk(2, -1), aten.chunk),
    (lambda x: x.split(4, 2), aten.split),
    (lambda x: x.split([3, 5], -1), aten.split_with_sizes),
], ids=["chunk", "split", "split_with_sizes"])
def test_split_along_channels(fn, packet):
    gm, (x,) = export(fn, (B, N, C))
    axes = {x: Axes(0, 1)}
    node = one(gm, packet)
    assert prop(node, axes) == AxisInfo(Axes(0, 1))
    axes[node] = Axes(0, 1)
    for item in calls(gm, operator.getitem):          # each piece keeps the axes
        assert prop(item, axes) == AxisInfo(Axes(0, 1))


@pytest.mark.parametrize("fn,packet", [
    (lambda x: x.chunk(2, 1), aten.chunk),
    (lambda x: x.split(2, -2), aten.split),
    (lambda x: x.split(1), aten.split),                # default dim 0: the batch
    (lambda x: x.split([1, 3], 1), aten.split_with_sizes),
], ids=["chunk-token", "split-token", "split-batch", "split_with_sizes-token"])
def test_split_refuses_token_or_batch_axis(fn, packet):
    gm, (x,) = export(fn, (B, N, C))
    refused(one(gm, packet), {x: X}, "splits-token-axis")


@pytest.mark.parametrize("fn,shape,in_axes,expect", [
    (lambda x: x.unbind(0), (3, B, N, C), Axes(1, 2), Axes(0, 1)),     # q, k, v = qkv.unbind(0)
    (lambda x: x.unbind(-1), (B, N, C), Axes(0, 1), Axes(0, 1)),
    (lambda x: x.unbind(2), (B, N, 3, C), Axes(0, 1), Axes(0, 1)),
    (lambda x: x.unbind(1), (B, 3, N, C), Axes(0, 2), Axes(0, 1)),
], ids=["qkv", "last", "after", "between"])
def test_unbind(fn, shape, in_axes, expect):
    gm, (x,) = export(fn, shape)
    node = one(gm, aten.unbind)
    info = prop(node, {x: in_axes})
    assert info == AxisInfo(expect)
    assert prop(calls(gm, operator.getitem)[0], {node: info.out}) == AxisInfo(expect)


@pytest.mark.parametrize("fn", [lambda x: x.unbind(1), lambda x: x.unbind()], ids=["token", "default-batch"])
def test_unbind_refuses_token_or_batch_axis(fn):
    gm, (x,) = export(fn, (B, N, C))
    refused(one(gm, aten.unbind), {x: X}, "splits-token-axis")


def test_getitem_passes_axes_of_its_input():
    gm, (x,) = export(lambda x: x.chunk(2, -1)[1], (B, N, C))
    chunk, item = one(gm, aten.chunk), calls(gm, operator.getitem)[-1]
    assert item.args == (chunk, 1)
    assert prop(item, {chunk: Axes(1, 2)}) == AxisInfo(Axes(1, 2))
    refused(item, {x: X}, "not-token-input")


# -- _slice ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,shape,in_axes,packet,expect", [
    (lambda x: x[..., 2:5], (B, N, C), Axes(0, 1), aten.slice, Axes(0, 1)),
    (lambda x: x.narrow(2, 1, 4), (B, N, C), Axes(0, 1), aten.narrow, Axes(0, 1)),
    (lambda x: x[:, :, 0], (B, N, C), Axes(0, 1), aten.select, Axes(0, 1)),
    (lambda x: x[1], (3, B, N, C), Axes(1, 2), aten.select, Axes(0, 1)),          # select before the axes
    (lambda x: x.select(1, 1), (B, 3, N, C), Axes(0, 2), aten.select, Axes(0, 1)),
    (lambda x: torch.ops.aten.slice.Tensor(x, 1, 0, 100), (B, N, C), Axes(0, 1), aten.slice, Axes(0, 1)),
    (lambda x: x.narrow(1, 0, N), (B, N, C), Axes(0, 1), aten.narrow, Axes(0, 1)),  # full: a no-op
    (lambda x: torch.ops.aten.slice.Tensor(x), (B, N, C), Axes(0, 1), aten.slice, Axes(0, 1)),  # dim 0, full
], ids=["slice-channels", "narrow-channels", "select-channel", "select-leading", "select-between",
        "full-slice-token", "full-narrow-token", "default-dim-full"])
def test_slice(fn, shape, in_axes, packet, expect):
    info, _ = out_of(fn, [shape], [in_axes], packet)
    assert info == AxisInfo(expect)


@pytest.mark.parametrize("fn,packet", [
    (lambda x: x[:, 1:3], aten.slice),
    (lambda x: x[:, ::2], aten.slice),
    (lambda x: x[:1], aten.slice),
    (lambda x: x.narrow(1, 1, 3), aten.narrow),
    (lambda x: x[:, 0], aten.select),
    (lambda x: x[0], aten.select),
], ids=["slice-token", "strided-token", "slice-batch", "narrow-token", "select-token", "select-batch"])
def test_slice_refuses_token_or_batch_axis(fn, packet):
    gm, (x,) = export(fn, (B, N, C))
    refused(one(gm, packet), {x: X}, "slices-token-axis")


# -- _cat / _stack -----------------------------------------------------------------------------

def test_cat_along_channels():
    info, (x, y) = out_of(lambda x, y: torch.cat([x, y], -1), [(B, N, C), (B, N, 3)], [X, X], aten.cat)
    assert info == AxisInfo(X)
    info, (x, e) = out_of(lambda x, e: torch.cat([x, e], 2), [(B, N, C), (B, N, 3)], [X, None], aten.cat)
    assert info.out == X and info.external == [External(e, Axes(0, 1), 3, 0)]
    info, _ = out_of(lambda a, b: torch.cat([a, b], 1), [(B, N, C), (B, 3, C)], [None, None], aten.cat)
    assert info == AxisInfo(None)


@pytest.mark.parametrize("dim,shape2,axes2", [
    (1, (B, N, C), X),                  # both carry tokens: the token axis grows
    (0, (B, N, C), None),               # another batch appended
    (-3, (B, N, C), X),
], ids=["token", "batch", "batch-negative"])
def test_cat_refuses_token_or_batch_axis(dim, shape2, axes2):
    gm, (x, y) = export(lambda x, y: torch.cat([x, y], dim), (B, N, C), shape2)
    axes = {x: X}
    if axes2 is not None:
        axes[y] = axes2
    refused(one(gm, aten.cat), axes, "concatenates-token-axis")


@pytest.mark.parametrize("dim,expect", [(0, Axes(1, 2)), (1, Axes(0, 2)), (2, Axes(0, 1)), (-1, Axes(0, 1)),
                                        (-2, Axes(0, 1))])
def test_stack(dim, expect):
    info, _ = out_of(lambda x, y: torch.stack([x, y], dim), [(B, N, C), (B, N, C)], [X, X], aten.stack)
    assert info == AxisInfo(expect)


def test_stack_refuses_mixed_inputs():
    gm, (x, w) = export(lambda x, w: torch.stack([x, w]), (B, N, C), (B, N, C))
    refused(one(gm, aten.stack), {x: X}, "stacks-mixed")


def test_stack_refuses_tokens_on_different_axes():
    gm, (x, y) = export(lambda x, y: torch.stack([x, y]), (B, N, N), (B, N, N))
    refused(one(gm, aten.stack), {x: X, y: Axes(0, 2)}, "token-axes-differ")


# -- _sdpa -------------------------------------------------------------------------------------

H, D = 2, 8
Q = Axes(0, 2)                          # (B, H, N, D)


def test_sdpa_self_attention_mixes_over_keys_and_values():
    info, (q, k, v) = out_of(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                             [(B, H, N, D)] * 3, [Q, Q, Q], aten.scaled_dot_product_attention)
    assert info == AxisInfo(Q, mixing_inputs=[k, v], external=[])


def test_sdpa_cross_attention_mixes_nothing_and_may_be_causal():
    for causal in (False, True):
        info, (q, k, v) = out_of(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                 [(B, H, N, D), (B, H, 3, D), (B, H, 3, D)], [Q, None, None],
                                 aten.scaled_dot_product_attention)
        assert info == AxisInfo(Q)


def test_sdpa_mixing_only_the_token_carrying_side():
    info, (q, k, v) = out_of(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                             [(B, H, N, D)] * 3, [Q, Q, None], aten.scaled_dot_product_attention)
    assert info.mixing_inputs == [k]


@pytest.mark.parametrize("mshape,expect", [
    ((B, 1, N, N), Axes(0, 2)),          # a per-sample, per-query mask
    ((N, N), Axes(None, 0)),             # one mask for every sample (expanded before the gather)
    ((1, 1, N, N), Axes(None, 2)),
    ((B, 1, 1, N), None),                # a key-padding mask: no query axis, not gathered
], ids=["per-sample", "shared", "shared-4d", "key-padding"])
def test_sdpa_mask_is_external_when_it_has_a_query_axis(mshape, expect):
    info, (q, k, v, m) = out_of(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                [(B, H, N, D)] * 3 + [mshape], [Q, Q, Q, None], aten.scaled_dot_product_attention)
    assert info.out == Q and info.mixing_inputs == [k, v]
    assert info.external == ([] if expect is None else [External(m, expect, 4, 0)])


def test_sdpa_refuses_queries_without_tokens():
    # learned queries attending over the tokens: every output depends on all tokens
    gm, (q, k, v) = export(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
                           (B, H, 3, D), (B, H, N, D), (B, H, N, D))
    refused(one(gm, aten.scaled_dot_product_attention), {k: Q, v: Q}, "queries-not-tokens", "do not come from")


def test_sdpa_refuses_tokens_off_the_sequence_axis():
    gm, (q, k, v) = export(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *[(B, N, H, D)] * 3)
    refused(one(gm, aten.scaled_dot_product_attention), {q: Axes(0, 1)}, "queries-not-tokens", "sequence axis")


def test_sdpa_refuses_causal_self_attention():
    gm, (q, k, v) = export(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                           *[(B, H, N, D)] * 3)
    node = one(gm, aten.scaled_dot_product_attention)
    refused(node, {q: Q, k: Q, v: Q}, "causal-attention")
    refused(node, {q: Q, v: Q}, "causal-attention")


def test_sdpa_refuses_token_dependent_mask():
    gm, (q, k, v, m) = export(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                              *[(B, H, N, D)] * 3, (B, 1, N, N))
    refused(one(gm, aten.scaled_dot_product_attention), {q: Q, k: Q, v: Q, m: Axes(0, 2)}, "token-dependent-mask")


# -- _matmul: softmax(Q K^T) V ------------------------------------------------------------------

def test_matmul_attention_path():
    def attn(q, k, v):
        s = q.matmul(k.transpose(-2, -1)) * D ** -0.5
        return s.softmax(-1).matmul(v)

    gm, (q, k, v) = export(attn, *[(B, H, N, D)] * 3)
    axes = {q: Q, k: Q, v: Q}
    infos = {}
    for node in calls(gm):
        infos[node] = prop(node, axes)
        axes[node] = infos[node].out
    kt = one(gm, aten.transpose)
    scores, out = calls(gm, aten.matmul)
    assert axes[kt] == Axes(0, 3)
    assert infos[scores] == AxisInfo(Q, mixing_inputs=[kt])       # QK^T: local in queries, mixing in keys
    assert axes[one(gm, aten.mul)] == Q and axes[one(gm, aten.softmax)] == Q
    assert infos[out] == AxisInfo(Q, mixing_inputs=[v])           # P V: mixing in values


@pytest.mark.parametrize("fn,shapes,in_axes,packet,expect", [
    (lambda x, w: x.matmul(w), [(B, N, C), (C, 5)], [X, None], aten.matmul, X),
    (lambda t, w: t.matmul(w), [(N, C), (B, C, 5)], [Axes(None, 0), None], aten.matmul, Axes(None, 1)),
    (lambda x, w: x.matmul(w), [(B, N, C), (3, B, C, 5)], [X, None], aten.matmul, Axes(1, 2)),
    (lambda x, w: torch.bmm(x, w), [(B, N, C), (B, C, 5)], [X, None], aten.bmm, X),
], ids=["weight", "broadcast-weight", "leading-axis", "bmm"])
def test_matmul_with_a_weight_keeps_axes(fn, shapes, in_axes, packet, expect):
    info, _ = out_of(fn, shapes, in_axes, packet)
    assert info == AxisInfo(expect)


def test_matmul_refuses_left_operand_without_tokens():
    # W @ x with tokens on x's last axis
    gm, (w, x) = export(lambda w, x: w.matmul(x), (5, C), (B, C, N))
    refused(one(gm, aten.matmul), {x: Axes(0, 2)}, "operand-no-tokens")


def test_matmul_refuses_contracting_token_axis():
    gm, (x, w) = export(lambda x, w: x.matmul(w), (B, C, N), (N, 5))
    refused(one(gm, aten.matmul), {x: Axes(0, 2)}, "contracts-token-axis")
    gm, (x, w) = export(lambda x, w: torch.bmm(x, w), (B, C, N), (B, N, 5))
    refused(one(gm, aten.bmm), {x: Axes(0, 2)}, "contracts-token-axis")


def test_matmul_with_vector_keeps_leading_axes():
    info, _ = out_of(lambda x, w: x.matmul(w), [(B, N, C), (C,)], [X, None], aten.matmul)
    assert info == AxisInfo(X)


def test_matmul_broadcasts_a_matrix_against_a_batched_right_operand():
    # (N, C) @ (B, C, 5) -> (B, N, 5): tokens move to axis 1; a 1-D right operand keeps a batch-less axis
    info, _ = out_of(lambda y, w: y.matmul(w), [(N, C), (B, C, 5)], [Axes(None, 0), None], aten.matmul)
    assert info == AxisInfo(Axes(None, 1))
    info, _ = out_of(lambda y, w: y.matmul(w), [(N, C), (C,)], [Axes(None, 0), None], aten.matmul)
    assert info == AxisInfo(Axes(None, 0))
