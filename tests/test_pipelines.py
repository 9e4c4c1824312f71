"""toca_fx.transform(pipe) on diffusers pipelines built from small random components."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import toca_fx
from conftest import diffusers, make_dit, make_pixart


def _vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                   up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                                   layers_per_block=1, sample_size=8).eval()


def _dit_pipe():
    return diffusers.DiTPipeline(transformer=make_dit(num_classes=1000), vae=_vae(),
                                 scheduler=diffusers.DDIMScheduler())


def _pixart_pipe():
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    te = T5EncoderModel(T5Config(vocab_size=32, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    return diffusers.PixArtAlphaPipeline(tokenizer=None, text_encoder=te, vae=_vae(), transformer=make_pixart(),
                                         scheduler=diffusers.DDIMScheduler())


def _run_dit(pipe, steps):
    return pipe(class_labels=[1, 2], num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _run_pixart(pipe, steps):
    g = torch.Generator().manual_seed(3)
    emb, mask = torch.randn(1, 7, 24, generator=g), torch.ones(1, 7)
    return pipe(prompt=None, prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt=None,
                negative_prompt_embeds=torch.zeros(1, 7, 24), negative_prompt_attention_mask=mask,
                num_inference_steps=steps, output_type="np", height=8, width=8, use_resolution_binning=False,
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("make,run", [(_dit_pipe, _run_dit), (_pixart_pipe, _run_pixart)], ids=["dit", "pixart"])
def test_pipeline_unchanged_and_fresh_generation_per_call(make, run):
    pipe = make()
    reference = run(copy.deepcopy(pipe), 6)
    out = toca_fx.transform(pipe, interval=1)
    assert out is pipe
    np.testing.assert_allclose(run(pipe, 6), reference, rtol=0, atol=1e-5)
    toca_fx.remove(pipe)
    toca_fx.transform(pipe, interval=3, fresh_ratio=0.3)
    first = run(pipe, 6)
    second = run(pipe, 6)
    np.testing.assert_array_equal(first, second)        # no state leaks from one call to the next
    st = toca_fx.stats(pipe)
    assert st.generations == 2
    assert st.calls == {"fresh": 4, "partial": 8}         # steps 0 and 3 fresh, per generation
    assert st.num_steps == 6                              # taken from num_inference_steps
    toca_fx.remove(pipe)
    assert type(pipe).__call__ is not None and not getattr(type(pipe), "_toca_fx_wrapped", False)


class _MLPPipeline:
    """A pipeline-shaped object whose transformer has no attention blocks (every list is rejected)."""

    def __init__(self):
        from blocks import MLPOnlyBlock, Stack
        torch.manual_seed(0)
        self.transformer = Stack([MLPOnlyBlock(16) for _ in range(3)]).eval()

    def __call__(self, x, num_inference_steps=2):
        with torch.no_grad():
            for t in range(num_inference_steps):
                x = self.transformer(x, timestep=torch.tensor([float(t)]))
        return x


def test_a_pipeline_whose_block_lists_are_all_rejected_is_left_as_it_was():
    pipe, x = _MLPPipeline(), torch.randn(1, 4, 16)
    reference = pipe(x)
    toca_fx.transform(pipe)
    with pytest.raises(toca_fx.ToCaError, match="every candidate block list was rejected"):
        pipe(x)
    assert not toca_fx.is_transformed(pipe) and type(pipe) is _MLPPipeline
    torch.testing.assert_close(pipe(x), reference)       # later calls run the original


def test_a_pipelines_custom_timesteps_set_the_generations_length():
    # PixArt's default is 20 steps; given timesteps=[...] diffusers runs len(timesteps) of them, and the
    # generation must be that long (tail_fresh=1 makes the length visible: the last call is fresh)
    pipe = _pixart_pipe()
    pipe.scheduler = diffusers.EulerDiscreteScheduler()
    toca_fx.transform(pipe, interval=100, fresh_ratio=0.3, tail_fresh=1)
    g = torch.Generator().manual_seed(3)
    emb, mask = torch.randn(1, 7, 24, generator=g), torch.ones(1, 7)
    pipe(prompt=None, prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt=None,
         negative_prompt_embeds=torch.zeros(1, 7, 24), negative_prompt_attention_mask=mask,
         timesteps=[999, 700, 400, 100, 10], output_type="np", height=8, width=8, use_resolution_binning=False,
         generator=torch.Generator().manual_seed(0))
    st = toca_fx.stats(pipe)
    assert st.num_steps == 5
    assert st.calls == {"fresh": 2, "partial": 3}        # the first and the last
