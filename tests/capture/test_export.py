"""Unit tests of capture_block, signature_of and structure_of (toca_fx/capture/export.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from toca_fx.capture.export import Capture, CaptureFailure, capture_block, signature_of, structure_of

torch.set_num_threads(1)
aten = torch.ops.aten
B, N, C = 2, 4, 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.lin = nn.Linear(C, C)
        self.register_buffer("scale", torch.full((C,), 0.5))
        self.const = torch.full((C,), 2.0)          # a plain tensor attribute: a lifted constant

    def forward(self, x, gate=None, flip=False):
        y = self.lin(self.norm(x)) * self.scale * self.const
        if gate is not None:
            y = y * gate
        b, n, c = x.shape
        y = y.view(b, n, 2, c // 2).flatten(2)       # sizes baked into the graph
        return (-y if flip else y), x + y


def capture(block, *args, **kwargs) -> Capture:
    return capture_block(block, args, kwargs, block.forward)


def run(cap: Capture, block, *args, **kwargs):
    flat = cap.gm(*cap.lifted_values(block), *cap.flatten_inputs(args, kwargs))
    return cap.unflatten_outputs(flat)


# -- capture_block -----------------------------------------------------------------------------

def test_lifted_parameters_buffers_constants_in_placeholder_order():
    blk = Block().eval()
    x = torch.randn(B, N, C)
    cap = capture(blk, x)
    assert cap.lifted == [("param", "norm.weight"), ("param", "norm.bias"), ("param", "lin.weight"),
                          ("param", "lin.bias"), ("buffer", "scale"), ("constant", "inner.const")]
    assert list(cap.constants) == ["inner.const"] and torch.equal(cap.constants["inner.const"], blk.const)
    ph = [n for n in cap.gm.graph.nodes if n.op == "placeholder"]
    assert len(ph) == len(cap.lifted) + cap.num_user_inputs and cap.num_user_inputs == 1
    vals = cap.lifted_values(blk)
    expect = [blk.norm.weight, blk.norm.bias, blk.lin.weight, blk.lin.bias, blk.scale, cap.constants["inner.const"]]
    assert len(vals) == 6 and all(a is b for a, b in zip(vals, expect))
    assert (cap.method, cap.seconds > 0) == ("torch.export", True)


def test_one_graph_serves_every_block_of_the_class():
    torch.manual_seed(0)
    a, b = Block().eval(), Block().eval()
    x = torch.randn(B, N, C)
    cap = capture(a, x)
    for blk in (a, b):                   # b's own parameters through a's graph
        got, ref = run(cap, blk, x), blk(x)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert not torch.equal(run(cap, a, x)[0], run(cap, b, x)[0])


def test_example_inputs_are_detached_copies():
    blk = Block().eval()
    x, g = torch.randn(B, N, C), torch.randn(B, 1, C)
    cap = capture(blk, x, gate=g, flip=True)
    assert cap.num_user_inputs == 3
    ex = cap.example_inputs
    assert len(ex) == 3 and ex[2] is True
    assert torch.equal(ex[0], x) and ex[0] is not x and torch.equal(ex[1], g) and ex[1] is not g


def test_kwargs_and_python_values_are_specialised():
    blk = Block().eval()
    x, g = torch.randn(B, N, C), torch.randn(B, 1, C)
    cap = capture(blk, x, gate=g, flip=True)
    got, ref = run(cap, blk, x, gate=g, flip=True), blk(x, gate=g, flip=True)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert any(n.target is aten.neg.default for n in cap.gm.graph.nodes)           # flip=True baked in
    plain = capture(blk, x)
    assert not any(n.target is aten.neg.default for n in plain.gm.graph.nodes)


def test_one_graph_per_signature():
    blk = Block().eval()
    x4, x6 = torch.randn(B, N, C), torch.randn(B, 6, C)
    c4, c4b, c6 = capture(blk, x4), capture(blk, torch.randn(B, N, C)), capture(blk, x6)
    assert signature_of((x4,), {}) != signature_of((x6,), {})
    assert c4.gm.code == c4b.gm.code                    # same signature: the same graph
    shapes = lambda cap: [tuple(n.meta["val"].shape) for n in cap.gm.graph.nodes
                          if n.op == "placeholder"][len(cap.lifted):]
    assert (shapes(c4), shapes(c6)) == ([(B, N, C)], [(B, 6, C)])
    assert c4.gm.code != c6.gm.code                     # the view sizes are baked in
    got = run(c6, blk, x6)
    assert torch.equal(got[1], blk(x6)[1])
    with pytest.raises(RuntimeError):                   # the (B, 4, C) graph does not take (B, 6, C)
        run(c4, blk, x6)


def test_shape_assertions_are_removed():
    class Cast(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(C, C)

        def forward(self, x):
            return self.lin(x).clone().to(torch.float64)

    blk = Cast()
    x = torch.randn(B, N, C)
    raw = torch.export.export(blk, (x,), strict=False).graph_module
    assert any(n.target is aten._assert_tensor_metadata.default for n in raw.graph.nodes)
    cap = capture(blk, x)
    assert not any(n.target is aten._assert_tensor_metadata.default for n in cap.gm.graph.nodes)
    assert torch.equal(run(cap, blk, x), blk(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)

    def forward(self, x):
        if x.sum() > 0:                 # Python control flow on a tensor value (as in MoE routing)
            return self.lin(x)
        return x


def test_data_dependent_control_flow_raises_capture_failure_with_reason():
    blk = DataDependent()
    with pytest.raises(CaptureFailure) as ei:
        capture(blk, torch.randn(B, N, C))
    exc = ei.value
    cause = exc.__cause__
    assert cause is not None
    msg = str(exc)
    assert type(cause).__name__ in msg and "\n" not in msg
    first = str(cause).strip().splitlines()[0]
    assert first[:60] in msg                            # the exporter's own reason, first line


class Mutating(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(C, C)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        if self.how == "add_":
            self.count.add_(1)
        elif self.how == "copy_":
            self.count.copy_(self.count + 1)
        else:
            self.count = self.count + 1
        return self.lin(x)


@pytest.mark.parametrize("how", ["add_", "copy_", "assign"])
def test_block_mutating_a_buffer_raises_capture_failure(how):
    blk = Mutating(how)
    with pytest.raises(CaptureFailure):
        capture(blk, torch.randn(B, N, C))


class MutatingMore(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(C, C)
        self.register_buffer("table", torch.zeros(4))
        self.const = torch.zeros(4)                  # a lifted constant

    def forward(self, x):
        how = self.how
        if how == "view":
            self.table[0].add_(1)                    # in place on a view of the buffer
        elif how == "setitem":
            self.table[1:] = 3.0                     # fill_ on a slice
        elif how == "split":
            self.table.split(2)[1].zero_()           # through a multi-output view
        elif how == "out":
            torch.add(x[0, 0, :4], 1, out=self.table)
        elif how == "param":
            self.lin.bias.add_(1)
        elif how == "constant":
            self.const.mul_(2)
        elif how == "const-assign":
            self.const = self.const + 1
        elif how == "param-assign":
            self.lin.bias = nn.Parameter(self.lin.bias * 2)
        elif how == "input":
            x.mul_(2)                                # the caller's tensor
        elif how == "grad-region":
            with torch.enable_grad():                # a wrap_with_set_grad_enabled subgraph
                self.table.add_(1)
        return self.lin(x)


@pytest.mark.parametrize("how,what", [
    ("view", "buffer 'table'"), ("setitem", "buffer 'table'"), ("split", "buffer 'table'"),
    ("out", "buffer 'table'"), ("param", "parameter 'lin.bias'"), ("constant", "constant 'inner.const'"),
    ("const-assign", "'const'"), ("param-assign", "parameter 'lin.bias'"), ("input", "user input 0"),
    ("grad-region", "buffer 'table'"),
])
def test_block_mutating_its_state_raises_capture_failure_naming_it(how, what):
    with pytest.raises(CaptureFailure) as ei:
        capture(MutatingMore(how), torch.randn(B, N, C))
    msg = str(ei.value)
    assert what in msg and "side effect" in msg and "\n" not in msg


def test_mutation_messages_name_the_op_and_the_buffer():
    for how, fragment in [("add_", "aten.add_.Tensor writes buffer 'count'"),
                          ("copy_", "aten.copy_.default writes buffer 'count'"),
                          ("assign", "reassigns its state in forward (buffer 'count')")]:
        with pytest.raises(CaptureFailure) as ei:
            capture(Mutating(how), torch.randn(B, N, C))
        assert fragment in str(ei.value), str(ei.value)


class InPlaceOnIntermediates(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(C, C)
        self.register_buffer("scale", torch.full((C,), 0.5))

    def forward(self, x):
        y = self.lin(x)
        y.mul_(2)                                    # intermediate tensors may be written in place
        y[:, 0].add_(1)
        s = self.scale.clone()
        s.add_(1)
        with torch.enable_grad():
            z = y * 2
            z.add_(s)
        self._memo = z.detach()                      # a new plain attribute: a memo, not state the graph reads
        return z


def test_in_place_ops_on_intermediates_are_captured():
    blk = InPlaceOnIntermediates()
    x = torch.randn(B, N, C)
    cap = capture(blk, x)
    # captured, with the writes made functional (capture/canonical.py): y.mul_(2) -> mul, y[:, 0].add_(1) ->
    # select_scatter(y, add(select(y)))
    names = [getattr(n.target, "__name__", "") for n in cap.gm.graph.nodes]
    assert "mul_.Tensor" not in names and "select_scatter.default" in names
    assert torch.allclose(run(cap, blk, x), blk(x))
    assert torch.equal(blk.scale, torch.full((C,), 0.5))


# -- signature_of ------------------------------------------------------------------------------

def test_signature_keys():
    x = torch.randn(B, N, C)
    sig = signature_of((x,), {"flip": True, "gate": None, "scale": 0.5, "name": "a"})
    assert isinstance(sig, tuple) and len(sig) == 2 and isinstance(sig[0], str)
    assert sig[1] == (("T", (B, N, C), torch.float32, "cpu"), ("V", "bool", True), ("V", "NoneType", None),
                      ("V", "float", 0.5), ("V", "str", "a"))
    hash(sig)


def test_signature_same_for_other_values_of_the_same_shapes():
    a = signature_of((torch.randn(B, N, C),), {"t": torch.tensor([1.0, 2.0])})
    b = signature_of((torch.zeros(B, N, C),), {"t": torch.tensor([5.0, 7.0])})
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize("other", [
    ((torch.randn(B, 6, C),), {}),                            # shape
    ((torch.randn(B, N, C, dtype=torch.float64),), {}),       # dtype
    ((torch.randn(B, N, C),), {"flip": True}),                # an extra keyword
    ((torch.randn(B, N, C), 3), {}),                          # an extra positional
    (([torch.randn(B, N, C)],), {}),                          # pytree structure
], ids=["shape", "dtype", "kwarg", "positional", "structure"])
def test_signature_differs(other):
    assert signature_of((torch.randn(B, N, C),), {}) != signature_of(*other)


def test_signature_of_python_values_and_objects():
    assert signature_of((1,), {}) != signature_of((2,), {})
    assert signature_of((True,), {}) != signature_of((1,), {})         # bool is not int
    obj = signature_of((torch.float16,), {})[1]
    assert obj == (("O", "dtype", "torch.float16"),)


# -- structure_of ------------------------------------------------------------------------------

def test_structure_of_exact_key():
    assert structure_of(nn.Linear(2, 3)) == (
        ("", "Linear", True, (("in_features", ("int", 2)), ("out_features", ("int", 3))),
         (("weight", (3, 2), torch.float32), ("bias", (3,), torch.float32)), ()),)
    assert structure_of(nn.Linear(2, 3).eval(), numbers=False) == (
        ("", "Linear", False, (("in_features", "#"), ("out_features", "#")),
         (("weight", (3, 2), torch.float32), ("bias", (3,), torch.float32)), ()),)


class Configured(nn.Module):
    def __init__(self, index=0, eps=1e-6, flag=False, mode="a", act=nn.GELU, width=C):
        super().__init__()
        self.index, self.eps, self.flag, self.mode, self.opt = index, eps, flag, mode, None
        self._private = index
        self.lin = nn.Linear(C, width)
        self.act = act()
        self.register_buffer("table", torch.zeros(width))


def test_structure_numbers_false_ignores_int_and_float_attributes():
    a, b = Configured(index=0), Configured(index=5, eps=1e-3)
    assert structure_of(a) != structure_of(b)
    assert structure_of(a, numbers=False) == structure_of(b, numbers=False)


@pytest.mark.parametrize("change", [{"flag": True}, {"mode": "b"}], ids=["bool", "str"])
def test_structure_keeps_bool_and_str_attributes(change):
    a, b = Configured(), Configured(**change)
    assert structure_of(a) != structure_of(b)
    assert structure_of(a, numbers=False) != structure_of(b, numbers=False)


def test_structure_attributes_of_the_root_module():
    root = structure_of(Configured(index=3))[0]
    assert root[:3] == ("", "Configured", True)
    assert root[3] == (("eps", ("float", 1e-6)), ("flag", ("bool", False)), ("index", ("int", 3)),
                       ("mode", ("str", "a")), ("opt", ("NoneType", None)))
    assert root[4] == () and root[5] == (("table", ((C,), torch.float32)),)
    assert structure_of(Configured(index=3), numbers=False)[0][3] == (
        ("eps", "#"), ("flag", ("bool", False)), ("index", "#"), ("mode", ("str", "a")), ("opt", ("NoneType", None)))
    assert [part[:2] for part in structure_of(Configured())] == [("", "Configured"), ("lin", "Linear"),
                                                                 ("act", "GELU")]


@pytest.mark.parametrize("other", [
    lambda: Configured(act=nn.SiLU),                    # a submodule of another class
    lambda: Configured(width=2 * C),                    # parameter / buffer shapes
    lambda: Configured().to(torch.float64),             # dtypes
], ids=["class", "shape", "dtype"])
def test_structure_differs_in_submodules_and_tensors(other):
    assert structure_of(Configured(), numbers=False) != structure_of(other(), numbers=False)


def test_structure_ignores_private_attributes_but_not_training_mode():
    a, b = Configured(), Configured()
    b._private = 99
    assert structure_of(a) == structure_of(b)
    b.lin.eval()                     # a dropout captured in train mode must not run after eval()
    assert structure_of(a, numbers=False) != structure_of(b, numbers=False)


class _Processor:
    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, x):
        return x * self.scale


@pytest.mark.parametrize("attr, a, b, coarse_differs", [
    ("coef", (1, 2), (1, 3), False),                 # numbers inside a tuple: numeric peers
    ("coef", (1, 2), (1, 2, 3), True),               # another length
    ("names", ["q", "k"], ["q", "v"], True),
    ("scale_t", torch.ones(2), torch.ones(3), True),  # a tensor attribute's shape
    ("act_fn", torch.nn.functional.gelu, torch.nn.functional.silu, True),   # callables by identity
    ("processor", _Processor(1.0), _Processor(2.0), False),              # an object's own attributes
    ("processor", _Processor(), object(), True),
], ids=["tuple-values", "tuple-length", "list-str", "tensor-shape", "callable", "processor-attr", "processor-class"])
def test_structure_keys_non_numeric_attributes(attr, a, b, coarse_differs):
    x, y = Configured(), Configured()
    setattr(x, attr, a)
    setattr(y, attr, b)
    assert structure_of(x) != structure_of(y)
    assert (structure_of(x, numbers=False) != structure_of(y, numbers=False)) == coarse_differs


def test_structure_skips_an_instance_forward():
    a, b = Configured(), Configured()
    b.forward = lambda x: x
    assert structure_of(a) == structure_of(b)
