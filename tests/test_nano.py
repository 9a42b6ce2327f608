"""The nano recipe's pieces (qwenimage_minimal/nano/), short enough for CI: each must be seen to learn."""

import torch

from qwenimage_minimal import images, nano, sizes
from qwenimage_minimal.nano import recipe, scenes, vae_training
from qwenimage_minimal.vae import QwenImageVAE


def pictures(n, seed, split="train", size=64):
    return torch.cat(
        [images.to_tensor(scenes.render(s, size)) for s in scenes.make_scenes(n, seed=seed, split=split)]
    )


def test_vae_training_lowers_the_loss_and_raises_held_out_psnr():
    torch.manual_seed(0)
    vae = QwenImageVAE(sizes.SIZES["nano"].vae)
    train, held_out = pictures(200, 0), pictures(16, 1, "held_out")
    before = vae_training.psnr(vae.decode(vae.encode(held_out).mean).detach(), held_out)
    rows = vae_training.train_vae(
        vae, train, {"held_out": held_out}, steps=300, batch=16, crop=32, lr=1e-3, eval_every=300, log=print
    )
    first = sum(r["reconstruction"] for r in rows[:10]) / 10
    last = sum(r["reconstruction"] for r in rows[-10:]) / 10
    after = rows[-1]["held_out_psnr"]
    print(f"reconstruction loss {first:.3f} -> {last:.3f}; held-out PSNR {before:.1f} -> {after:.1f} dB")
    assert last < 0.7 * first and after > before + 3


def test_object_crops_centre_on_objects_and_latent_statistics_normalise():
    x = pictures(20, 0)
    mask = vae_training.object_mask(x)
    assert 0.02 < mask.float().mean() < 0.5  # objects are a minority of the pixels
    crops, crop_mask = vae_training.object_crops(x, mask, 32, 64, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 3, 32, 32) and crop_mask.float().mean() > 2 * mask.float().mean()
    vae = QwenImageVAE(sizes.SIZES["nano"].vae)
    mean, std = vae_training.latent_statistics(vae, x, batch=7)
    assert len(mean) == len(std) == vae.config.z_dim
    z = vae.encode(x).mean
    normalised = (z - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert (
        normalised.mean((0, 2, 3)).abs().max() < 1e-4 and (normalised.std((0, 2, 3)) - 1).abs().max() < 1e-4
    )


def test_other_pictures_are_unlike_the_scenes_and_outside_scenes_hold_new_colours_and_stars():
    others = vae_training.other_pictures(24, 64, seed=0)
    assert others.shape == (24, 3, 64, 64) and others.min() >= -1 and others.max() <= 1
    assert torch.equal(others, vae_training.other_pictures(24, 64, seed=0))
    # their colours are everywhere in RGB, not the palette's nine (background included)
    rgb = ((others + 1) * 127.5).round().permute(0, 2, 3, 1).reshape(-1, 3).unique(dim=0)
    assert len(rgb) > 1000
    outside = scenes.outside_scenes(30, seed=0)
    assert all(
        any(t.colour in scenes.NEW_COLOURS or t.shape in scenes.NEW_SHAPES for t in s.things) for s in outside
    )
    assert {t.colour for s in outside for t in s.things} >= set(scenes.NEW_COLOURS)
    assert "star" in {t.shape for s in outside for t in s.things}


def test_the_quick_recipe_lowers_both_losses_and_writes_a_loadable_model(tmp_path):
    """`train-nano --quick`: data, VAE, latent statistics, the MMDiT through train.py, scoring; about a minute."""
    from qwenimage_minimal import pipeline

    report = recipe.build(nano.NanoConfig(out=str(tmp_path / "nano"), **nano.QUICK))
    vae, dit = report["vae"], report["mmdit"]
    print(
        f"VAE reconstruction {vae['loss_first']:.3f} -> {vae['loss_last']:.3f}; MMDiT flow-matching loss "
        f"{dit['loss_first']:.3f} -> {dit['loss_last']:.3f}; {report['minutes']} min"
    )
    assert dit["loss_last"] < 0.5 * dit["loss_first"] and vae["loss_last"] < 0.8 * vae["loss_first"]
    assert set(report["vae"]["stored"]) == {"held_out_psnr", "outside_psnr", "outside_colour"}
    assert [r["cfg"] for r in report["diversity"]] == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert set(report["scores"]) == {
        "single_object",
        "single_colour",
        "single_shape",
        "single_position",
        "two_objects",
        "colour",
        "shape",
        "position",
        "binding",
    }
    pipe = pipeline.QwenImagePipeline.from_pretrained(tmp_path / "nano" / "model")
    assert pipe.transformer.config == sizes.SIZES["nano"].transformer
    stats = pipe.vae.config.latents_std
    assert stats != sizes.SIZES["nano"].vae.latents_std and all(s > 0 for s in stats)
