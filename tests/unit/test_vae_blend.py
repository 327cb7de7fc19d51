"""The planner's vectorised tile blending (fastvideo_grpo/vae_blend.py) against diffusers' own loops:
each blend method on random tensors, then a whole tiled decode of the tiny 2D and HunyuanVideo VAEs."""

import pytest
import torch

pytest.importorskip("diffusers")

from fastvideo_grpo.cli.vae_blend import BLEND_DIMS, vectorise_blends  # noqa: E402
from tests.support.tiny_models import tiny_hunyuan_vae, tiny_vae_2d  # noqa: E402

SMALL_TILES = dict(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                   tile_sample_stride_width=8)


@pytest.mark.parametrize("make,shape", [(tiny_vae_2d, (2, 3, 9, 11)), (tiny_hunyuan_vae, (1, 3, 7, 9, 11))])
@pytest.mark.parametrize("extent", [1, 4, 20])  # 20: clipped to the tensors' size, as diffusers does
def test_each_blend_matches_diffusers_loop(make, shape, extent):
    ref, fast = make(), make()
    assert vectorise_blends(fast) == sum(hasattr(ref, n) for n in BLEND_DIMS) >= 2
    g = torch.Generator().manual_seed(extent)
    for name in BLEND_DIMS:
        if not hasattr(ref, name):
            continue
        a = torch.randn(shape, generator=g, dtype=torch.float64)
        b = torch.randn(shape, generator=g, dtype=torch.float64)
        want = getattr(ref, name)(a, b.clone(), extent)
        b_fast = b.clone()
        got = getattr(fast, name)(a, b_fast, extent)
        assert got is b_fast  # in place, as the loop
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert not torch.equal(want, b)  # the blend did change b


@pytest.mark.parametrize("make,latent", [(tiny_vae_2d, (1, 4, 16, 16)), (tiny_hunyuan_vae, (1, 4, 2, 4, 4))])
def test_tiled_decode_is_unchanged(make, latent):
    torch.manual_seed(0)
    ref = make().eval()
    fast = make().eval()
    fast.load_state_dict(ref.state_dict())
    args = SMALL_TILES if "tile_sample_stride_width" in str(ref.enable_tiling.__code__.co_varnames) else {}
    for vae in (ref, fast):
        vae.enable_tiling(**args)
        if not args:  # AutoencoderKL takes its tile size from attributes
            vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 16, 8, 0.5
    vectorise_blends(fast)
    z = torch.randn(latent, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode(z).sample
        got = fast.decode(z).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
