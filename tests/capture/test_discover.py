"""Unit tests of find_block_lists (toca_fx/capture/discover.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from toca_fx.capture.discover import BlockList, find_block_lists

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, inner=None):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if inner is not None:                   # a nested list of `inner` sublayers
            self.sub = nn.ModuleList([nn.Linear(4, 4) for _ in range(inner)])


class OtherBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)


class Model(nn.Module):
    def __init__(self, **lists):
        super().__init__()
        for name, mods in lists.items():
            setattr(self, name, mods)


def test_accepts_list_of_same_class_blocks_with_parameters():
    blocks = [Block(), Block(), Block()]
    model = Model(pre=nn.Linear(4, 4), blocks=nn.ModuleList(blocks))
    found, notes = find_block_lists(model)
    assert notes == []
    assert len(found) == 1
    (bl,) = found
    assert isinstance(bl, BlockList)
    assert (bl.name, bl.cls, bl.rejected, len(bl)) == ("blocks", Block, None, 3)
    assert all(a is b for a, b in zip(bl.modules, blocks)) and len(bl.modules) == 3
    assert bl.names == ["blocks.0", "blocks.1", "blocks.2"]


def test_several_lists_in_module_order_with_qualified_names():
    model = Model(enc=Model(layers=nn.ModuleList([Block(), Block()])), dec=nn.ModuleList([OtherBlock()]))
    found, notes = find_block_lists(model)
    assert notes == []
    assert [(bl.name, bl.cls, len(bl)) for bl in found] == [("enc.layers", Block, 2), ("dec", OtherBlock, 1)]
    assert found[0].names == ["enc.layers.0", "enc.layers.1"] and found[1].names == ["dec.0"]


def test_root_module_list():
    found, notes = find_block_lists(nn.ModuleList([Block(), Block()]))
    assert notes == []
    assert [(bl.name, bl.names) for bl in found] == [("", ["0", "1"])]


def test_lists_nested_in_a_root_candidate_are_skipped():
    found, notes = find_block_lists(nn.ModuleList([Block(inner=2), Block(inner=0)]))
    assert [bl.name for bl in found] == [""] and notes == []


def test_empty_list_is_noted():
    found, notes = find_block_lists(Model(nothing=nn.ModuleList(), blocks=nn.ModuleList([Block()])))
    assert [bl.name for bl in found] == ["blocks"]
    assert len(notes) == 1 and notes[0].startswith("nothing:") and "empty" in notes[0]


def test_mixed_classes_are_noted_with_their_classes():
    found, notes = find_block_lists(Model(mixed=nn.ModuleList([Block(), OtherBlock(), Block()])))
    assert found == []
    assert len(notes) == 1
    assert notes[0].startswith("mixed:") and "2" in notes[0] and "Block, OtherBlock" in notes[0]


def test_parameter_less_children_are_noted():
    found, notes = find_block_lists(Model(acts=nn.ModuleList([nn.GELU(), nn.GELU()]),
                                          blocks=nn.ModuleList([Block()])))
    assert [bl.name for bl in found] == ["blocks"]
    assert len(notes) == 1 and notes[0].startswith("acts:") and "parameters" in notes[0]
    assert not any(n.startswith("blocks") for n in notes)


def test_root_label_in_notes():
    _, notes = find_block_lists(nn.ModuleList())
    assert len(notes) == 1 and notes[0].startswith("<root>:")


def test_lists_nested_in_a_candidate_are_skipped():
    # every block holds its own ModuleList: only the outermost list is a candidate, and the inner
    # lists are not even noted
    model = Model(blocks=nn.ModuleList([Block(inner=2), Block(inner=2)]))
    found, notes = find_block_lists(model)
    assert [bl.name for bl in found] == ["blocks"] and notes == []
    # an empty inner list would be noted if it were looked at
    model = Model(blocks=nn.ModuleList([Block(inner=0), Block(inner=0)]))
    found, notes = find_block_lists(model)
    assert [bl.name for bl in found] == ["blocks"] and notes == []


def test_lists_nested_in_a_rejected_list_are_looked_at():
    outer = nn.ModuleList([Block(inner=2), OtherBlock()])
    found, notes = find_block_lists(Model(outer=outer))
    assert [bl.name for bl in found] == ["outer.0.sub"]
    assert found[0].cls is nn.Linear and found[0].names == ["outer.0.sub.0", "outer.0.sub.1"]
    assert len(notes) == 1 and notes[0].startswith("outer:")


def test_prefix_of_a_name_is_not_nesting():
    # "blocks" is a candidate; "blocks2" only shares a prefix and is looked at on its own
    model = Model(blocks=nn.ModuleList([Block()]), blocks2=nn.ModuleList([OtherBlock(), OtherBlock()]))
    found, notes = find_block_lists(model)
    assert [(bl.name, bl.cls) for bl in found] == [("blocks", Block), ("blocks2", OtherBlock)] and notes == []
