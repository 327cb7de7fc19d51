"""The tiny random-init denoisers and VAEs of every model family, built from diffusers' own classes at toy
sizes: the one place the tests (adapters, tiny training runs, distributed workers, export) get them.

``tiny_components(family)`` -> ({subfolder: model}, adapter kwargs), seeded, ready for ``save_pretrained``
into a diffusers-format folder that the adapter's real ``from_pretrained`` path loads. The per-class
builders (``tiny_flux`` ...) take the few sizes that callers vary.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

TEXT_LEN = 6  # text tokens of the SD tokenizer stand-in (max_sequence_length)
FAMILIES = ("sd", "flux", "hunyuan_t2i", "hunyuan_t2v", "hunyuan_i2v", "wan", "wan_i2v", "sd3", "qwen_image",
            "qwen_image_edit", "wan22_a14b", "wan22_5b", "wan22_5b_i2v", "hunyuan15_t2v", "ltx2", "flux2_klein",
            "flux2_dev", "z_image")


def _diffusers():
    import diffusers

    return diffusers


def tiny_vae_2d(**kw):
    """SD / FLUX / SD3-style AutoencoderKL: 4 latent channels, 2x spatial compression."""
    return _diffusers().AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, **kw)


def tiny_hunyuan_vae():
    """HunyuanVideo's causal 3D VAE: 8x spatial, 4x temporal compression."""
    return _diffusers().AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True)


def tiny_wan_vae():
    """Wan 2.1's VAE: 16 latent channels, 8x spatial, 4x temporal compression."""
    return _diffusers().AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True])


WAN22_Z = 8  # latent channels of the tiny Wan 2.2 VAE (the real one has 48)


def tiny_wan22_vae():
    """Wan 2.2's VAE (TI2V-5B): residual blocks, 2x2 pixel patches, 16x spatial and 4x temporal compression."""
    return _diffusers().AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=WAN22_Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.1 * i - 0.3 for i in range(WAN22_Z)],
        latents_std=[0.8 + 0.1 * i for i in range(WAN22_Z)])


HV15_C = 4  # latent channels of the tiny HunyuanVideo 1.5 VAE (the real one has 32)


def tiny_hunyuan15_vae():
    """HunyuanVideo 1.5's VAE: 16x spatial, 4x temporal compression."""
    return _diffusers().AutoencoderKLHunyuanVideo15(
        latent_channels=HV15_C, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1, spatial_compression_ratio=16,
        temporal_compression_ratio=4, scaling_factor=0.9)


def tiny_hunyuan15(num_layers: int = 1, text_dim: int = 32, text_2_dim: int = 48):
    """HunyuanVideo 1.5's dual-stream transformer: latents + condition latents + mask in, 2 heads of 8;
    ``text_dim`` / ``text_2_dim``: the Qwen2.5-VL and ByT5 hidden sizes (tests/support/tiny_encoders.py)."""
    return _diffusers().HunyuanVideo15Transformer3DModel(
        in_channels=2 * HV15_C + 1, out_channels=HV15_C, num_attention_heads=2, attention_head_dim=8,
        num_layers=num_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=text_dim, text_embed_2_dim=text_2_dim, image_embed_dim=16, rope_axes_dim=(2, 4, 2),
        target_size=32, task_type="t2v")


def tiny_ltx2_vae():
    """LTX-2's video VAE at toy size (diffusers' own pipeline test's): 4 latent channels, 4x4 pixel patches and one
    spatial downsampling (8x), 2x temporal; decodes only here (the encoder is never used)."""
    vae = _diffusers().AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=4, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    with torch.no_grad():  # per-channel statistics that are not the identity, so that (de)normalising is tested
        vae.latents_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.05]))
        vae.latents_std.copy_(torch.tensor([1.5, 0.8, 2.0, 1.1]))
    return vae


def tiny_ltx2_audio_vae():
    """LTX-2's audio VAE at toy size: only its settings and statistics are read (by LTX2Pipeline): 16 kHz, hop 160,
    4x temporal compression, 2 latent channels x 8 / 4 mel bins = 4 = the tiny transformer's audio token width."""
    return _diffusers().AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, in_channels=2, resolution=32,
        latent_channels=2, mel_bins=8)


def tiny_ltx2_connectors(caption_channels: int = 16, encoder_layers: int = 2):
    """LTX-2's text connectors (LTX2TextConnectors, the pipeline's ``connectors/``) over a Gemma 3 text model of
    ``caption_channels`` width and ``encoder_layers`` layers (tests/support/tiny_encoders.py): 2 learnable registers
    (the real stack has 128) replacing the padding, one block per stream."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    return LTX2TextConnectors(
        caption_channels=caption_channels, text_proj_in_factor=encoder_layers + 1, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=caption_channels // 2, video_connector_num_layers=1,
        video_connector_num_learnable_registers=2, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=caption_channels // 2, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=2, connector_rope_base_seq_len=32, rope_double_precision=False,
        rope_type="split")


def tiny_ltx2_vocoder():
    """LTX-2's vocoder at toy size (LTX2Pipeline decodes the audio with it when it returns pixels)."""
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    return LTX2Vocoder(in_channels=2 * 8, hidden_channels=8, out_channels=2, upsample_kernel_sizes=[4],
                       upsample_factors=[2], resnet_kernel_sizes=[3], resnet_dilations=[[1]],
                       output_sampling_rate=16000)


def tiny_ltx2(num_layers: int = 1, caption_channels: int = 16):
    """LTX-2's audio-video transformer: video and audio tokens of width 4, 2 heads each; ``caption_channels``: the
    text connectors' width (tests/support/tiny_encoders.py's Gemma 3 hidden size)."""
    return _diffusers().LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=num_layers, qk_norm="rms_norm_across_heads",
        caption_channels=caption_channels, rope_double_precision=False, rope_type="split")


def tiny_sd_unet():
    return _diffusers().UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


def tiny_flux(num_layers: int = 1, num_single_layers: int = 1):
    return _diffusers().FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def tiny_hunyuan(in_channels: int = 4, num_layers: int = 1, num_single_layers: int = 1):
    """in_channels 4 for text-to-video / image, 8 for image-to-video (latents + image latents)."""
    return _diffusers().HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 2))


def tiny_wan(in_channels: int = 16, out_channels: int = 16, **kw):
    """in_channels 16 for text-to-video; 36 with image_dim / added_kv_proj_dim for image-to-video; Wan 2.2
    TI2V-5B: in = out = the Wan 2.2 VAE's z_dim."""
    return _diffusers().WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=out_channels,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, **kw)


def tiny_sd3():
    return _diffusers().SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=16, out_channels=4)


def tiny_toy_adapter(seed: int = 0):
    """The toy task's DiT at one block with N(0, 0.05) weights (so that its velocity is not near zero), as a
    ToyAdapter: the cheapest real policy for algorithm tests."""
    from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig, ToyAdapter

    torch.manual_seed(seed)
    m = TinyDiT(TinyDiTConfig(image_size=16, patch_size=4, hidden=32, depth=1, heads=2))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return ToyAdapter(m)


def tiny_qwen_vae():
    """Qwen-Image's VAE (one-frame causal 3D): 4 latent channels with per-channel mean / std, 2x spatial."""
    return _diffusers().AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[1.5, 0.8, 2.0, 1.1])


def tiny_qwen_image(num_layers: int = 1, in_channels: int = 16):
    """Qwen-Image's MMDiT over 2x2-packed latents of a 4-channel VAE (in_channels = 4 x 4)."""
    return _diffusers().QwenImageTransformer2DModel(
        patch_size=2, in_channels=in_channels, out_channels=4, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def tiny_flux2_vae():
    """FLUX.2's VAE: 4 latent channels, 2x spatial, 2 x 2 patchified into 16 batch-normalised channels (random
    running statistics, so that the normalisation matters)."""
    vae = _diffusers().AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def tiny_flux2(num_layers: int = 1, num_single_layers: int = 1, joint_attention_dim: int = 32,
               guidance_embeds: bool = False):
    """FLUX.2's MMDiT over the 16 patchified channels of the tiny FLUX.2 VAE (guidance_embeds: the dev model)."""
    return _diffusers().Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)


def tiny_z_image(num_layers: int = 1, cap_feat_dim: int = 16):
    """Z-Image's single-stream DiT (2 x 2 patches of a 4-channel latent, one refiner layer of each kind)."""
    return _diffusers().ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=num_layers, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=cap_feat_dim, axes_dims=[4, 6, 6], axes_lens=[128, 32, 32])


def tiny_components(family: str) -> Tuple[Dict[str, torch.nn.Module], dict]:
    """({subfolder: tiny model}, adapter kwargs) of ``family``, built under seed 0."""
    torch.manual_seed(0)
    video = dict(resolution=32, num_frames=5)
    if family == "sd":
        return {"unet": tiny_sd_unet(), "vae": tiny_vae_2d(scaling_factor=0.18215)}, dict(
            resolution=16, max_sequence_length=TEXT_LEN)
    if family == "flux":
        return {"transformer": tiny_flux(), "vae": tiny_vae_2d(scaling_factor=0.5, shift_factor=0.1)}, dict(resolution=16)
    if family == "hunyuan_t2i":
        return {"transformer": tiny_hunyuan(4), "vae": tiny_hunyuan_vae()}, dict(resolution=32)
    if family == "hunyuan_t2v":
        return {"transformer": tiny_hunyuan(4), "vae": tiny_hunyuan_vae()}, video
    if family == "hunyuan_i2v":
        return {"transformer": tiny_hunyuan(8), "vae": tiny_hunyuan_vae()}, video
    if family == "wan":
        return {"transformer": tiny_wan(), "vae": tiny_wan_vae()}, video
    if family == "wan_i2v":
        return {"transformer": tiny_wan(in_channels=36, image_dim=8, added_kv_proj_dim=24), "vae": tiny_wan_vae()}, video
    if family == "sd3":
        return {"transformer": tiny_sd3(), "vae": tiny_vae_2d(scaling_factor=1.5305, shift_factor=0.0609)}, dict(
            resolution=16)
    if family == "qwen_image":
        return {"transformer": tiny_qwen_image(), "vae": tiny_qwen_vae()}, dict(resolution=16)
    if family == "qwen_image_edit":  # the same architecture; the reference image rides in the token sequence
        return {"transformer": tiny_qwen_image(), "vae": tiny_qwen_vae()}, dict(resolution=16, reference_resolution=12)
    if family == "wan22_a14b":  # two experts of one architecture (different random weights); shift 12 puts the
        # boundary 0.875 between the 2nd and 3rd of 3 steps (t = 1000, 960 | 857)
        return {"transformer": tiny_wan(), "transformer_2": tiny_wan(), "vae": tiny_wan_vae()}, dict(
            video, boundary_ratio=0.875)
    if family in ("wan22_5b", "wan22_5b_i2v"):  # 64 px: 4 x 4 latents, 2 x 2 tokens per latent frame
        return {"transformer": tiny_wan(WAN22_Z, WAN22_Z), "vae": tiny_wan22_vae()}, dict(resolution=64, num_frames=5)
    if family == "hunyuan15_t2v":  # 32 px: 2 x 2 latents per frame, 2 latent frames
        return {"transformer": tiny_hunyuan15(), "vae": tiny_hunyuan15_vae()}, video
    if family == "ltx2":  # 32 px (the pipeline's multiple), 5 frames: 3 x 4 x 4 video and 5 audio tokens (24 fps)
        return {"transformer": tiny_ltx2(), "vae": tiny_ltx2_vae()}, dict(resolution=32, num_frames=5)
    if family == "flux2_klein":
        return {"transformer": tiny_flux2(), "vae": tiny_flux2_vae()}, dict(resolution=16)
    if family == "flux2_dev":  # guidance-distilled: the guidance scale is a model input
        return {"transformer": tiny_flux2(guidance_embeds=True), "vae": tiny_flux2_vae()}, dict(resolution=16)
    if family == "z_image":  # the FLUX.1 VAE's scaling and shift
        return {"transformer": tiny_z_image(), "vae": tiny_vae_2d(scaling_factor=0.3611, shift_factor=0.1159)}, dict(
            resolution=16)
    raise KeyError(f"no tiny components for {family!r}; families: {FAMILIES}")
