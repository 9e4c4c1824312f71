"""Small random-weight models built from third-party constructors, and sampling loops."""

from __future__ import annotations

import copy

import pytest
import torch

import toca_fx

diffusers = pytest.importorskip("diffusers")


from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402 (after the importorskip)


class ScaledProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor with its output scaled: a user's per-block processor."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return super().__call__(attn, hidden_states, *args, **kwargs) * self.scale


def make_dit(num_layers=3, heads=2, head_dim=16, sample=8, seed=0, num_classes=10):
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=sample, patch_size=2, num_embeds_ada_norm=num_classes).eval()


def make_pixart(num_layers=3, heads=2, head_dim=16, sample=8, seed=0):
    torch.manual_seed(seed)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=sample, patch_size=2, cross_attention_dim=heads * head_dim,
        caption_channels=24, norm_type="ada_norm_single", use_additional_conditions=False).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def sample_dit(model, steps=20, batch=2, sample=8, seed=0, guidance=4.0):
    """DDIM sampling with classifier-free guidance in one batch (as diffusers' DiTPipeline)."""
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, sample, sample, generator=g)
    labels = torch.arange(batch) % 10
    null = torch.full((batch,), 10)
    with torch.no_grad():
        for t in sch.timesteps:
            out = model(torch.cat([x, x]), timestep=torch.full((2 * batch,), int(t)),
                        class_labels=torch.cat([labels, null])).sample
            e_c, e_u = out[:, :4].chunk(2)
            x = sch.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return x


def pixart_text(batch=2, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, tokens, 24, generator=g)
    mask = torch.ones(batch, tokens)
    mask[-1, tokens - 2:] = 0
    return emb, mask


def sample_pixart(model, steps=20, batch=2, sample=8, seed=0, guidance=4.5):
    """DDIM sampling with CFG in one batch and a masked text condition (as PixArtAlphaPipeline)."""
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, sample, sample, generator=g)
    emb, mask = pixart_text(batch)
    null_emb, null_mask = torch.zeros_like(emb), torch.ones_like(mask)
    with torch.no_grad():
        for t in sch.timesteps:
            out = model(torch.cat([x, x]), encoder_hidden_states=torch.cat([emb, null_emb]),
                        encoder_attention_mask=torch.cat([mask, null_mask]),
                        timestep=torch.full((2 * batch,), int(t)),
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            e_c, e_u = out[:, :4].chunk(2)
            x = sch.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return x


@pytest.fixture
def dit_pair():
    m = make_dit()
    return m, copy.deepcopy(m)


@pytest.fixture
def pixart_pair():
    m = make_pixart()
    return m, copy.deepcopy(m)


# -- the public inspection seam ---------------------------------------------------------------

def programs(model):
    """The model's block programs (``toca_fx.explain(model).programs``), with one block of each."""
    rep = toca_fx.explain(model)
    return [(p, model.get_submodule(e.blocks[0])) for p, e in zip(rep.programs, rep.entries)]


def program(model):
    """The one block program of a model whose blocks share one class and signature."""
    (p,) = toca_fx.explain(model).programs
    return p


def branch_state(model, block: str, branch=0):
    """The named cache submodule of one block and CFG branch (visible in ``print(model)``)."""
    return model.get_submodule(f"_toca_fx_state.{block.replace('.', '__')}.branch_{branch}")
