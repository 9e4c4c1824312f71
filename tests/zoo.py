"""The model zoo: tiny random-weight diffusion transformers from their diffusers / transformers
constructors, each with a function making the inputs of one denoising call.

``ZOO[name]() -> (model, make_inputs)`` with ``make_inputs(step) -> kwargs``; inputs change with the
step (new latents and timestep), as in sampling.
"""

from __future__ import annotations

import torch

import diffusers


def _g(step, salt=0):
    return torch.Generator().manual_seed(1000 * salt + step)


def _t(step, b):
    return torch.full((b,), 900 - 100 * step)


def dit():
    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return m, lambda s: dict(hidden_states=torch.randn(2, 4, 8, 8, generator=_g(s)), timestep=_t(s, 2),
                             class_labels=torch.tensor([1, 10]))


def pixart_sigma():
    torch.manual_seed(0)
    m = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                           caption_channels=12, norm_type="ada_norm_single",
                                           use_additional_conditions=False, interpolation_scale=None)
    return m, lambda s: dict(hidden_states=torch.randn(2, 4, 8, 8, generator=_g(s)),
                             encoder_hidden_states=torch.randn(2, 5, 12, generator=_g(0, 1)),
                             encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).float(),
                             timestep=_t(s, 2), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sd3(dual=False):
    def build():
        torch.manual_seed(0)
        m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                            caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                            pos_embed_max_size=16, qk_norm="rms_norm",
                                            dual_attention_layers=(0,) if dual else ())
        return m, lambda s: dict(hidden_states=torch.randn(2, 4, 8, 8, generator=_g(s)),
                                 encoder_hidden_states=torch.randn(2, 5, 12, generator=_g(0, 1)),
                                 pooled_projections=torch.randn(2, 10, generator=_g(0, 2)), timestep=_t(s, 2))
    return build


def flux():
    torch.manual_seed(0)
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                         pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
    n = 16
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(n, 3)
    return m, lambda s: dict(hidden_states=torch.randn(2, n, 8, generator=_g(s)),
                             encoder_hidden_states=torch.randn(2, 5, 12, generator=_g(0, 1)),
                             pooled_projections=torch.randn(2, 10, generator=_g(0, 2)),
                             timestep=_t(s, 2).float() / 1000, img_ids=img_ids, txt_ids=torch.zeros(5, 3))


def hunyuan():
    torch.manual_seed(0)
    m = diffusers.HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                                    sample_size=8, hidden_size=16, num_layers=4, cross_attention_dim=12,
                                    cross_attention_dim_t5=16, pooled_projection_dim=16, text_len=5, text_len_t5=6,
                                    use_style_cond_and_image_meta_size=False)
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))
    return m, lambda s: dict(hidden_states=torch.randn(2, 4, 8, 8, generator=_g(s)), timestep=_t(s, 2).float(),
                             encoder_hidden_states=torch.randn(2, 5, 12, generator=_g(0, 1)),
                             text_embedding_mask=torch.ones(2, 5), encoder_hidden_states_t5=torch.randn(2, 6, 16, generator=_g(0, 2)),
                             text_embedding_mask_t5=torch.ones(2, 6), image_rotary_emb=rope)


def cogvideox():
    torch.manual_seed(0)
    m = diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                              time_embed_dim=8, text_embed_dim=12, num_layers=2, sample_width=8,
                                              sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                                              max_text_seq_length=5)
    return m, lambda s: dict(hidden_states=torch.randn(2, 2, 4, 8, 8, generator=_g(s)),
                             encoder_hidden_states=torch.randn(2, 5, 12, generator=_g(0, 1)), timestep=_t(s, 2))


def latte():
    torch.manual_seed(0)
    m = diffusers.LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                          norm_type="ada_norm_single", caption_channels=12, video_length=3)
    return m, lambda s: dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=_g(s)), timestep=_t(s, 2),
                             encoder_hidden_states=torch.randn(2, 5, 12, generator=_g(0, 1)))


def sana():
    torch.manual_seed(0)
    m = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=1)
    return m, lambda s: dict(hidden_states=torch.randn(2, 4, 8, 8, generator=_g(s)),
                             encoder_hidden_states=torch.randn(2, 5, 12, generator=_g(0, 1)), timestep=_t(s, 2))


def auraflow():
    torch.manual_seed(0)
    m = diffusers.AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                             num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2,
                                             joint_attention_dim=12, caption_projection_dim=16, out_channels=4,
                                             pos_embed_max_size=64)
    return m, lambda s: dict(hidden_states=torch.randn(2, 4, 8, 8, generator=_g(s)),
                             encoder_hidden_states=torch.randn(2, 5, 12, generator=_g(0, 1)), timestep=_t(s, 2))


def vit():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 image_size=8, patch_size=2, num_channels=3)
    m = transformers.ViTModel(cfg, add_pooling_layer=False)
    return m, lambda s: dict(pixel_values=torch.randn(2, 3, 8, 8, generator=_g(s)))


def gpt2():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2Model(cfg)
    return m, lambda s: dict(input_ids=torch.randint(0, 50, (2, 8), generator=_g(s)))


ZOO = {
    "dit": dit, "pixart-sigma": pixart_sigma, "sd3": sd3(), "sd3.5-dual": sd3(dual=True), "flux": flux,
    "hunyuan-dit": hunyuan, "cogvideox": cogvideox, "latte": latte, "sana": sana, "auraflow": auraflow,
    "vit": vit, "gpt2": gpt2,
}


# -- more diffusers 0.42 models (issue 14): each exercises one layout the pass must read ----------------

def _wake(m):
    """Zero-initialised modulations and output projections make branches vanish (every call would
    trivially match): give every all-zero parameter small random values."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.numel() > 1 and not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return m


def ace_step():
    """Grouped-query attention: 4 query heads share 2 key/value heads (SDPA's enable_gqa)."""
    torch.manual_seed(0)
    m = diffusers.AceStepTransformer1DModel(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, in_channels=8,
                                            audio_acoustic_hidden_dim=4, patch_size=2, sliding_window=4,
                                            encoder_hidden_size=16)
    return _wake(m), lambda s: dict(hidden_states=torch.randn(2, 16, 4, generator=_g(s)),
                                    timestep=_t(s, 2).float() / 1000, timestep_r=_t(s, 2).float() / 1000,
                                    encoder_hidden_states=torch.randn(2, 5, 16, generator=_g(0, 1)),
                                    context_latents=torch.randn(2, 16, 4, generator=_g(0, 2)))


def ernie_image():
    """Sequence-first blocks: the stream is (S, B, C), permuted to batch-first around the attention."""
    torch.manual_seed(0)
    m = diffusers.ErnieImageTransformer2DModel(hidden_size=16, num_attention_heads=2, num_layers=2, ffn_hidden_size=32,
                                               in_channels=4, out_channels=4, patch_size=1, text_in_dim=12,
                                               rope_axes_dim=(2, 2, 4))
    return _wake(m), lambda s: dict(hidden_states=torch.randn(2, 4, 4, 4, generator=_g(s)), timestep=_t(s, 2).float(),
                                    text_bth=torch.randn(2, 5, 12, generator=_g(0, 1)), text_lens=torch.tensor([5, 3]))


def _wan_like(cls):
    """Wan's RoPE writes into slices of an ``empty_like`` in place."""
    def build():
        torch.manual_seed(0)
        m = cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
        return _wake(m), lambda s: dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=_g(s)), timestep=_t(s, 2),
                                        encoder_hidden_states=torch.randn(2, 5, 12, generator=_g(0, 1)))
    return build


def z_image():
    """``autocast(enabled=False)`` regions: torch.export's ``wrap_with_autocast`` submodules."""
    torch.manual_seed(0)
    m = diffusers.ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=2,
                                           n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=12,
                                           axes_dims=[2, 2, 4], axes_lens=[64, 16, 16])
    return _wake(m), lambda s: dict(x=[torch.randn(4, 1, 8, 8, generator=_g(s, 3 + i)) for i in range(2)],
                                    t=_t(s, 2).float() / 1000,
                                    cap_feats=[torch.randn(8, 12, generator=_g(0, 1 + i)) for i in range(2)])


ZOO_MORE = {
    "ace-step": ace_step, "ernie-image": ernie_image, "wan": _wan_like(diffusers.WanTransformer3DModel),
    "skyreels-v2": _wan_like(diffusers.SkyReelsV2Transformer3DModel), "z-image": z_image,
}
