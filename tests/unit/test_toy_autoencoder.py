"""The toy autoencoder (the demo's latent space) and the latent toy model around it.

Reference: the rule reward on the rendered images themselves. Reconstructions must pass exactly the
checks the renders pass; normalised latents must have zero mean and unit std per channel (closed form).
"""

import pytest
import torch

from fastvideo_grpo.models.toy import (TinyDiT, TinyDiTConfig, ToyAdapter, build_toy, load_toy_autoencoder,
                                       save_toy_model)
from fastvideo_grpo.models.toy_autoencoder import GRID, CellAutoencoder, CellAutoencoderConfig
from fastvideo_grpo.rewards.rules import toy_geneval
from fastvideo_grpo.cli.pretrain import AUTOENCODER_DEFAULTS, model_configs, pretrain_settings, train_autoencoder
from fastvideo_grpo.toy.shapes import all_prompts, make_dataset


@pytest.fixture(scope="module")
def trained():
    images, prompts = make_dataset(all_prompts(), 400, 32, seed=3)
    settings = {**AUTOENCODER_DEFAULTS, "steps": 600}
    ae = train_autoencoder(images, CellAutoencoderConfig(), settings, seed=0, progress=False)
    return ae, images, prompts


def test_reconstructions_pass_the_checks_the_renders_pass(trained):
    ae, images, prompts = trained
    with torch.no_grad():
        rec = ae.decode(ae.encode(images))
    reward = toy_geneval()
    want, want_info = reward(images, prompts)
    got, got_info = reward(rec, prompts)
    assert torch.equal(want_info["all_correct"], torch.ones(len(prompts)))  # the renders pass everything
    assert torch.equal(got_info["all_correct"], want_info["all_correct"])
    assert torch.allclose(got, want)
    assert float(got_info["background"].max()) <= 0.01  # the decoder draws no texture
    assert float((rec - images).abs().mean()) < 0.02


def test_latents_are_normalised_per_channel(trained):
    ae, images, _ = trained
    with torch.no_grad():
        z = ae.encode(images)
    assert z.shape == (images.shape[0], ae.cfg.channels, GRID, GRID)
    flat = z.permute(1, 0, 2, 3).reshape(ae.cfg.channels, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(ae.cfg.channels), atol=1e-4)
    assert torch.allclose(flat.std(1), torch.ones(ae.cfg.channels), atol=1e-3)


def test_cells_round_trip_exactly():
    ae = CellAutoencoder(CellAutoencoderConfig(image_size=16))
    x = torch.rand(3, 3, 16, 16)
    cells = ae.to_cells(x)
    assert cells.shape == (3, GRID, GRID, 3 * 4 * 4)
    # cell (1, 2) holds rows 4..7 and columns 8..11
    assert torch.equal(cells[0, 1, 2].reshape(3, 4, 4), x[0, :, 4:8, 8:12] * 2 - 1)
    assert torch.allclose(ae.from_cells(cells), x, atol=1e-6)


def test_bad_shapes_raise_value_errors():
    with pytest.raises(ValueError, match="multiple"):
        CellAutoencoderConfig(image_size=30)
    with pytest.raises(ValueError, match=">= 1"):
        CellAutoencoderConfig(channels=0)
    ae = CellAutoencoder(CellAutoencoderConfig())
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        ae.encode(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, 4, 4\)"):
        ae.decode(torch.randn(2, 4, 4, 4))


def _latent_model(channels=3):
    return TinyDiT(TinyDiTConfig(image_size=GRID, patch_size=1, channels=channels, hidden=32, depth=1, heads=2))


def test_latent_adapter_samples_latents_and_decodes_images(tmp_path):
    ae = CellAutoencoder(CellAutoencoderConfig())
    ad = ToyAdapter(_latent_model(), autoencoder=ae)
    z = ad.initial_noise(5, torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert z.shape == (5, 3, GRID, GRID)
    cond = ad.encode_prompts(["two red circles"] * 5)
    u = ad.predict(z, torch.full((5,), 900.0), cond)
    assert u.shape == z.shape
    img = ad.decode(z)
    assert img.shape == (5, 3, 32, 32) and float(img.min()) >= 0 and float(img.max()) <= 1
    assert torch.equal(img, ae.decode(z))
    assert not any(p.requires_grad for p in ad.autoencoder.parameters())  # the decoder stays frozen

    # the checkpoint carries the autoencoder; the registry's builder restores both
    path = tmp_path / "m.pt"
    save_toy_model(ad.model, path, ae)
    again = build_toy(checkpoint=str(path))
    assert torch.equal(again.decode(z), img)
    assert torch.equal(again.predict(z, torch.full((5,), 900.0), cond), u)
    save_toy_model(TinyDiT(TinyDiTConfig(image_size=16, patch_size=4, hidden=32, depth=1, heads=2)), tmp_path / "p.pt")
    assert load_toy_autoencoder(tmp_path / "p.pt") is None


def test_model_and_autoencoder_must_agree():
    ae = CellAutoencoder(CellAutoencoderConfig(channels=3))
    with pytest.raises(ValueError, match="latents"):
        ToyAdapter(_latent_model(channels=4), autoencoder=ae)
    with pytest.raises(ValueError, match="latents"):
        ToyAdapter(TinyDiT(TinyDiTConfig(image_size=16, patch_size=4, hidden=32, depth=1, heads=2)), autoencoder=ae)
    with pytest.raises(ValueError, match="give its autoencoder"):
        ToyAdapter(_latent_model(channels=4))


def test_pretraining_settings_derive_the_latent_model():
    s = pretrain_settings({"model": {"hidden": 32, "pos_std": 1.0}, "autoencoder": {"channels": 4}})
    assert s["autoencoder"] == {**AUTOENCODER_DEFAULTS, "channels": 4}
    dit, ae = model_configs(s)
    assert (dit.image_size, dit.patch_size, dit.channels, dit.hidden, dit.pos_std) == (GRID, 1, 4, 32, 1.0)
    assert ae.channels == 4 and ae.image_size == 32
    assert model_configs(pretrain_settings({}))[1] is None  # no autoencoder: a pixel model
    with pytest.raises(ValueError, match="contradict"):
        model_configs(pretrain_settings({"model": {"image_size": 32}, "autoencoder": {}}))
    with pytest.raises(ValueError, match="unknown autoencoder"):
        pretrain_settings({"autoencoder": {"depth": 2}})
