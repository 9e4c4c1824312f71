"""Unit tests of toca_fx/analysis/residual.py on tiny hand-written blocks.

Each block is exported with ``torch.export.export(..., strict=False)`` (parameters lifted to the
leading placeholders, as the capture stage does); B, N, C = 2, 4, 8.
"""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from toca_fx.analysis.graph import to_nx
from toca_fx.analysis.residual import SpineError, find_streams, joint_root, residual_adds
from torch.export.graph_signature import InputKind

torch.set_num_threads(1)
aten = torch.ops.aten
B, N, C = 2, 4, 8


class Attn(nn.Module):
    """Self-attention (or joint attention when given ``extra`` tokens to attend with)."""

    def __init__(self, c=C, heads=2):
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.heads = heads

    def heads_of(self, x):
        b, n, c = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.heads_of(x)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def mlp(c=C):
    return nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))


class Captured:
    """An exported block: graph module, number of lifted inputs, user placeholders, outputs."""

    def __init__(self, block, *args):
        ep = torch.export.export(block.eval(), args, strict=False)
        self.gm = ep.graph_module
        self.graph = self.gm.graph
        self.g = to_nx(self.graph)
        self.n_lifted = sum(1 for s in ep.graph_signature.input_specs if s.kind != InputKind.USER_INPUT)
        ph = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.lifted, self.inputs = ph[:self.n_lifted], ph[self.n_lifted:]
        self.outputs = list(self.graph.output_node().args[0])

    def streams(self):
        return find_streams(self.gm, self.n_lifted, self.g)

    def adds(self, x0, out):
        return residual_adds(self.graph, self.g, x0, out)


def module_of(node):
    """The deepest module path export recorded for ``node`` ('' for the block itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def x_(*shape):
    return torch.randn(*shape) if shape else torch.randn(B, N, C)


# -- plain pre-norm block ----------------------------------------------------------------------

class PreNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.attn, self.n2, self.mlp = nn.LayerNorm(C), Attn(), nn.LayerNorm(C), mlp()

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


def test_plain_pre_norm_block():
    cap = Captured(PreNorm(), x_())
    (x,) = cap.inputs
    (out,) = cap.outputs
    assert cap.n_lifted == 12 and cap.streams() == [(x, out)]
    st = cap.adds(x, out)
    assert (st.input, st.output, st.root) == (x, out, x)
    assert len(st.adds) == 2
    a0, a1 = st.adds
    assert a0.add.target is aten.add.Tensor and a1.add is out
    assert (a0.spine_in, a1.spine_in) == (x, a0.add)
    assert (module_of(a0.branch), module_of(a1.branch)) == ("attn.proj", "mlp.2")
    assert st.nodes == {x, a0.add, a1.add}
    assert joint_root(cap.g, x) is None


# -- gated (adaLN) block -----------------------------------------------------------------------

class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.ada = nn.Linear(C, 6 * C)
        self.n1 = nn.LayerNorm(C, elementwise_affine=False)
        self.n2 = nn.LayerNorm(C, elementwise_affine=False)
        self.attn, self.mlp = Attn(), mlp()

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, -1)
        x = x + g1 * self.attn(self.n1(x) * (1 + sc1) + sh1)
        return x + g2 * self.mlp(self.n2(x) * (1 + sc2) + sh2)


def test_gated_block_branches_are_the_gate_products():
    cap = Captured(Gated(), x_(), x_(B, C))
    x, c = cap.inputs
    (out,) = cap.outputs
    assert cap.streams() == [(x, out)]
    st = cap.adds(x, out)
    # the shift adds (norm(x) * (1 + scale) + shift) have the stream's shape but are not residuals
    n_stream_shaped_adds = sum(1 for n in cap.graph.nodes if n.target is aten.add.Tensor
                               and tuple(n.meta["val"].shape) == (B, N, C))
    assert n_stream_shaped_adds == 4
    assert len(st.adds) == 2
    a0, a1 = st.adds
    assert (a0.spine_in, a1.spine_in) == (x, a0.add) and a1.add is out
    for ra, mod in zip(st.adds, ("attn.proj", "mlp.2")):
        assert ra.branch.target is aten.mul.Tensor
        lin = [a for a in ra.branch.args if a.target is aten.linear.default]
        assert len(lin) == 1 and module_of(lin[0]) == mod


# -- nested residual: x + mlp(norm(x + attn(x))) -----------------------------------------------

class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.norm, self.mlp = Attn(), nn.LayerNorm(C), mlp()

    def forward(self, x):
        return x + self.mlp(self.norm(x + self.attn(x)))


def test_nested_residual_both_adds_build_on_the_input():
    cap = Captured(Nested(), x_())
    (x,) = cap.inputs
    (out,) = cap.outputs
    assert cap.streams() == [(x, out)]
    st = cap.adds(x, out)
    assert len(st.adds) == 2
    inner, outer = st.adds
    assert (inner.spine_in, outer.spine_in) == (x, x)
    assert outer.add is out and nx.has_path(cap.g, inner.add, outer.branch)   # the MLP reads x + attn(x)
    assert module_of(inner.branch) == "attn.proj" and module_of(outer.branch) == "mlp.2"
    assert st.nodes == {x, inner.add, outer.add}


# -- parallel residual (SD3.5's second attention reads the block input) ------------------------

class ParallelResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.attn, self.attn2, self.n2, self.mlp = nn.LayerNorm(C), Attn(), Attn(), nn.LayerNorm(C), mlp()

    def forward(self, x):
        h = self.n1(x)
        x1 = x + self.attn(h)
        x2 = x1 + self.attn2(h)            # reads the input's norm, not x1
        return x2 + self.mlp(self.n2(x2))


def test_parallel_residual_reads_an_earlier_stream_value():
    cap = Captured(ParallelResidual(), x_())
    (x,) = cap.inputs
    (out,) = cap.outputs
    st = cap.adds(x, out)
    assert len(st.adds) == 3
    a0, a1, a2 = st.adds
    assert (a0.spine_in, a1.spine_in, a2.spine_in) == (x, a0.add, a1.add)
    assert [module_of(a.branch) for a in st.adds] == ["attn.proj", "attn2.proj", "mlp.2"]


# -- parallel branches summed before one residual add ------------------------------------------

class SummedBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(C), Attn(), mlp()

    def forward(self, x):
        h = self.norm(x)
        return x + (self.attn(h) + self.mlp(h))


def test_add_of_two_branches_is_not_a_residual():
    cap = Captured(SummedBranches(), x_())
    (x,) = cap.inputs
    (out,) = cap.outputs
    st = cap.adds(x, out)
    assert len(st.adds) == 1
    (ra,) = st.adds
    assert ra.add is out and ra.spine_in is x
    assert ra.branch.target is aten.add.Tensor          # the inner sum is the branch


# -- stream starting after a non-residual op (a long-skip fusion) ------------------------------

class LongSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.fuse, self.attn, self.norm, self.mlp = nn.Linear(2 * C, C), Attn(), nn.LayerNorm(C), mlp()

    def forward(self, x, skip):
        h = self.fuse(torch.cat([x, skip], -1))
        h = h + self.attn(h)
        return h + self.mlp(self.norm(h))


def test_stream_starting_after_a_fusion():
    cap = Captured(LongSkip(), x_(), x_())
    x, skip = cap.inputs
    (out,) = cap.outputs
    assert cap.streams() == [(x, out)]                 # neither input is on the skip path: the first
    st = cap.adds(x, out)
    assert module_of(st.root) == "fuse" and st.root.target is aten.linear.default
    assert len(st.adds) == 2
    assert (st.adds[0].spine_in, st.adds[1].spine_in) == (st.root, st.adds[0].add)
    assert st.nodes == {x, st.root, st.adds[0].add, st.adds[1].add}


# -- copies of the stream, adds with alpha -----------------------------------------------------

class CopiedStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = mlp()

    def forward(self, x):
        h = x.clone()
        return h + self.mlp(h)


def test_copy_of_the_stream_is_the_stream():
    cap = Captured(CopiedStream(), x_())
    (x,) = cap.inputs
    (out,) = cap.outputs
    st = cap.adds(x, out)
    (clone,) = [n for n in cap.graph.nodes if n.target is aten.clone.default]
    assert len(st.adds) == 1 and st.adds[0].spine_in is clone and st.root is x
    assert st.nodes == {x, clone, out}


class AlphaAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = mlp()

    def forward(self, x):
        return torch.add(x, self.mlp(x), alpha=0.5)


def test_add_with_alpha_is_not_a_residual():
    cap = Captured(AlphaAdd(), x_())
    (x,) = cap.inputs
    (out,) = cap.outputs
    assert out.target is aten.add.Tensor and out.kwargs == {"alpha": 0.5}
    assert cap.adds(x, out).adds == []


# -- two streams: text and image joined for attention, split back ------------------------------

class Joint(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_img, self.n_txt = nn.LayerNorm(C), nn.LayerNorm(C)
        self.a_img, self.a_txt = Attn(), Attn()
        self.m_img, self.m_txt = mlp(), mlp()
        self.n2_img, self.n2_txt = nn.LayerNorm(C), nn.LayerNorm(C)

    def forward(self, txt, img):
        nt = txt.shape[1]
        qt, kt, vt = self.a_txt.heads_of(self.n_txt(txt))
        qi, ki, vi = self.a_img.heads_of(self.n_img(img))
        q, k, v = (torch.cat([a, b], dim=2) for a, b in ((qt, qi), (kt, ki), (vt, vi)))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        txt = txt + self.a_txt.proj(o[:, :nt])
        img = img + self.a_img.proj(o[:, nt:])
        txt = txt + self.m_txt(self.n2_txt(txt))
        img = img + self.m_img(self.n2_img(img))
        return txt, img


def test_joint_block_has_two_streams_most_tokens_first():
    cap = Captured(Joint(), x_(B, 3, C), x_(B, 5, C))
    txt, img = cap.inputs
    txt_out, img_out = cap.outputs
    assert cap.streams() == [(img, img_out), (txt, txt_out)]
    for x0, out, prefix in ((img, img_out, "a_img"), (txt, txt_out, "a_txt")):
        st = cap.adds(x0, out)
        assert len(st.adds) == 2
        a0, a1 = st.adds
        assert (a0.spine_in, a1.spine_in) == (x0, a0.add) and a1.add is out
        assert module_of(a0.branch) == f"{prefix}.proj" and module_of(a1.branch) == f"m_{prefix[2:]}.2"
        # the concatenation is of queries/keys/values, not of the stream itself
        assert joint_root(cap.g, x0) is None


# -- joined sequence: the block concatenates the streams itself --------------------------------

class Joined(nn.Module):
    def __init__(self, dim=1):
        super().__init__()
        self.dim = dim
        self.n1, self.attn, self.n2, self.mlp = nn.LayerNorm(C), Attn(), nn.LayerNorm(C), mlp()

    def forward(self, txt, img):
        nt = txt.shape[1]
        x = torch.cat([txt, img.clone()], dim=self.dim)
        x = x + self.attn(self.n1(x))
        x = x + self.mlp(self.n2(x))
        return x[:, :nt], x[:, nt:]


def test_joined_sequence_is_the_stream():
    cap = Captured(Joined(dim=-2), x_(B, 3, C), x_(B, 5, C))
    txt, img = cap.inputs
    txt_out, img_out = cap.outputs
    assert cap.streams() == [(img, img_out), (txt, txt_out)]
    assert cap.adds(img, img_out).adds == [] and cap.adds(txt, txt_out).adds == []
    (cat,) = [n for n in cap.graph.nodes if n.target is aten.cat.default]
    assert joint_root(cap.g, txt) is cat
    assert joint_root(cap.g, img) is cat                # through the clone (a pass-through op)
    st = cap.adds(cat, img_out)
    assert st.root is cat and len(st.adds) == 2
    assert (st.adds[0].spine_in, st.adds[1].spine_in) == (cat, st.adds[0].add)


class ChannelCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.mlp = nn.Linear(2 * C, C), mlp()

    def forward(self, a, b):
        x = self.proj(torch.cat([a, b], dim=-1))
        return x + self.mlp(x)


def test_channel_concatenation_is_not_a_joint_root():
    cap = Captured(ChannelCat(), x_(), x_())
    a, b = cap.inputs
    assert joint_root(cap.g, a) is None and joint_root(cap.g, b) is None


# -- choosing the stream input -----------------------------------------------------------------

class CrossAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.kv, self.proj = nn.Linear(C, C), nn.Linear(C, 2 * C), nn.Linear(C, C)

    def forward(self, ctx, x):          # the context comes first and has the stream's shape
        k, v = self.kv(ctx).chunk(2, -1)
        return x + self.proj(F.scaled_dot_product_attention(self.q(x), k, v))


def test_stream_input_is_the_one_on_the_skip_path():
    cap = Captured(CrossAttn(), x_(), x_())
    ctx, x = cap.inputs
    (out,) = cap.outputs
    assert cap.streams() == [(x, out)]
    st = cap.adds(x, out)
    assert len(st.adds) == 1 and st.adds[0].spine_in is x


class WithTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.randn(B, N, C))
        self.lin = nn.Linear(C, C)

    def forward(self, x):
        return self.pos + self.lin(x)


def test_lifted_inputs_are_not_streams():
    cap = Captured(WithTable(), x_())
    (x,) = cap.inputs
    (out,) = cap.outputs
    assert cap.n_lifted == 3 and cap.lifted[-1].name.endswith("pos")
    assert cap.streams() == [(x, out)]
    # counted as a user input, the buffer of the stream's shape on the skip path would win
    assert find_streams(cap.gm, 0, cap.g) == [(cap.lifted[-1], out)]


# -- SpineError --------------------------------------------------------------------------------

class Unrelated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, x, c):
        return self.lin(c).unsqueeze(1).expand(-1, N, -1) * 2.0


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, x):
        return self.lin(x).flatten(1)


@pytest.mark.parametrize("block,args", [
    (Unrelated(), (x_(), x_(B, C))),     # a (B, N, C) output that does not depend on x
    (Flat(), (x_(),)),                   # no (B, N, C) output
], ids=["independent-output", "no-3d-output"])
def test_no_stream_raises_spine_error(block, args):
    cap = Captured(block, *args)
    assert tuple(cap.outputs[0].meta["val"].shape) in ((B, N, C), (B, N * C))
    with pytest.raises(SpineError):
        cap.streams()
