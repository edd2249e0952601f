"""The shapes-64 tiny decoder: architecture, the latent convention shared with onestep.decode, a
quick distillation run on a tiny KL VAE, and the shipped folder (its quality against the recipe's)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines import loading, onestep, registry, speed
from training.config import TinyDecoderConfig, from_dict
from training.methods import tiny_decoder

SHAPES_VAE = registry.ROOT / registry.SHAPES_DIR / "vae"
SHIPPED = registry.ROOT / registry.SHAPES_TINY_DECODER


def shapes_vae_config() -> dict:
    return json.loads((SHAPES_VAE / "config.json").read_text())


def test_architecture_decodes_16x16x8_to_64x64():
    vcfg = shapes_vae_config()
    tiny = tiny_decoder.build_model(TinyDecoderConfig(), vcfg)
    assert tiny.config.latent_channels == vcfg["latent_channels"] == 8
    # what speed._tiny_decoder checks against the pipeline's vae_scale_factor (4 for shapes-64)
    assert tiny.config.upsampling_scaling_factor ** (len(tiny.config.decoder_block_out_channels) - 1) == 4
    with torch.no_grad():
        out = tiny.decode(torch.randn(2, 8, 16, 16)).sample
    assert out.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="num_blocks needs 3 entries"):
        tiny_decoder.build_model(TinyDecoderConfig(num_blocks=(1, 1)), vcfg)
    assert from_dict({"method": "tiny_decoder", "channels": 16}).channels == 16


@pytest.fixture(scope="module")
def small_kl(tmp_path_factory):
    """A small random AutoencoderKL with the shapes-64 layout (3 levels, 8 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 16, 16), layers_per_block=1,
                        latent_channels=8, norm_num_groups=8, sample_size=64, scaling_factor=0.4)
    folder = tmp_path_factory.mktemp("kl") / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("scaling_factor", [0.0, 1.0])
def test_quick_distillation_lowers_the_loss_in_onestep_s_convention(small_kl, tmp_path, scaling_factor):
    cfg = TinyDecoderConfig(vae_dir=str(small_kl), run_dir=str(tmp_path / "run"), steps=40, batch_size=4, lr=3e-3,
                            warmup=1, log_every=1, save_every=20, threads=1, data_size=16, num_latents=8, channels=8,
                            num_blocks=(1, 1, 0), scaling_factor=scaling_factor)
    res = tiny_decoder.train(cfg)
    assert res["finished"] and (tmp_path / "run" / "latents.safetensors").is_file()
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    tiny, kl = res["model"], res["vae"]
    assert tiny.config.scaling_factor == pytest.approx(scaling_factor or 0.4)
    # the training loss is measured exactly as onestep.decode runs either decoder: same z, same targets
    data = tiny_decoder.load_data(cfg, kl)
    z, targets = data["latents"], data["targets"].float() / 127.5 - 1
    with torch.no_grad():
        via_onestep = onestep.decode(SimpleNamespace(vae=tiny), z)
        kl_images = onestep.decode(SimpleNamespace(vae=kl), z)
        d = via_onestep - targets
        trained_on = float(tiny_decoder.loss_fn(tiny, z, data["targets"], 0))
        assert float((d.abs() + d ** 2).mean()) == pytest.approx(trained_on, rel=1e-5)
    assert (kl_images.clamp(-1, 1) - targets).abs().max() <= 1 / 255 + 1e-5  # targets: the KL decoder at 8 bits
    # unperturbed latents are the KL encoder's (scaled) modes of the pool's first images
    first = data["sigma"] == 0
    from training.common import to_tensor
    from training.data import pool

    images = to_tensor(pool(16, seed=cfg.seed)[0][:8])
    modes = tiny_decoder.encode_mode(kl, images) * kl.config.scaling_factor
    assert torch.allclose(z[first], modes[first], atol=1e-5)
    # resumed: nothing left to do, and the cached data is reused
    again = tiny_decoder.train(cfg)
    assert again["step"] == 40 and again["finished"]
    # the export loads through the app's loader, in the dtype asked for
    out = tiny_decoder.export(tiny, tmp_path / "tiny-decoder")
    loaded = loading.load_tiny_decoder(out, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(onestep.decode(SimpleNamespace(vae=loaded), z[:2]), via_onestep[:2], atol=1e-5)


def test_registry_points_shapes_models_at_their_tiny_decoder(tiny_sd, shapes_student):
    for model in ("shapes-64", "shapes-64-teacher", "shapes-64-4step"):
        assert registry.tiny_decoder_source(registry.get(model)) == str(SHIPPED)
    assert registry.tiny_decoder_source(registry.get(str(shapes_student))) == str(SHIPPED)  # distilled from it
    assert registry.tiny_decoder_source(registry.get(str(tiny_sd))) == "madebyollin/taesd"
    assert registry.tiny_decoder_source(registry.get("stabilityai/sdxl-turbo")) == "madebyollin/taesdxl"


needs_shipped = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(),
                                   reason="assets/models/shapes-64/tiny-decoder not built (recipe stage tiny_decoder)")


@needs_shipped
def test_shipped_tiny_decoder_reconstructs_renders_near_the_recipe_s_rate():
    from diffusers import AutoencoderKL

    from shapes import judge
    from training.common import to_tensor
    from training.data import make_pool
    from training.methods.vae import psnr

    tiny = loading.load_tiny_decoder(SHIPPED, device="cpu")
    assert type(tiny).__name__ == "AutoencoderTiny" and tiny.config.latent_channels == 8
    recorded = json.loads((registry.ROOT / registry.SHAPES_DIR / "recipe.json").read_text())["tiny_decoder"]
    kl = AutoencoderKL.from_pretrained(SHAPES_VAE, use_safetensors=True).eval()
    images, prompts = make_pool(128, seed=40_000)  # never seen in training or in the recipe's measurement
    x = to_tensor(images)
    with torch.no_grad():
        z = tiny_decoder.encode_mode(kl, x) * kl.config.scaling_factor  # what the UNet makes: scaled latents
        small = onestep.decode(SimpleNamespace(vae=tiny), z).clamp(-1, 1)
        full = onestep.decode(SimpleNamespace(vae=kl), z).clamp(-1, 1)
    arr = ((small + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rate = float(np.mean([judge(p, a)[0] for p, a in zip(prompts, arr)]))
    # the rate varies between pools more than a binomial would (0.83 on the recipe's 512, 0.74-0.79 on
    # two other 256-image pools), so "near" is within 0.15; random weights or a wrong scaling score ~0
    assert rate >= recorded["tiny_shapeeval"] - 0.15
    assert float(psnr(small, full).mean()) >= recorded["tiny_vs_vae_psnr_db"] - 1.5  # close to the KL decoder
    assert float(psnr(small, x).mean()) >= recorded["tiny_psnr_db"] - 1.5


@needs_shipped
def test_tiny_decoder_option_needs_no_path_for_shapes_models():
    """`--tiny-decoder` without a folder on a shapes-64 model: its variant decodes with the shipped
    AutoencoderTiny, close to the full VAE on the same latents, and the cached pipeline is untouched."""
    pipe = loading.load_pipeline("shapes-64-teacher", device="cpu")
    variant = speed.pipeline("shapes-64-teacher", speed.TorchOptions(tiny_decoder=True), device="cpu")
    try:
        assert type(variant.vae).__name__ == "AutoencoderTiny" and type(pipe.vae).__name__ == "AutoencoderKL"
        from training.common import to_tensor
        from training.data import make_pool
        from training.methods.vae import psnr

        x = to_tensor(make_pool(8, seed=40_001)[0])
        with torch.no_grad():
            z = tiny_decoder.encode_mode(pipe.vae, x) * pipe.vae.config.scaling_factor
            assert float(psnr(onestep.decode(variant, z), onestep.decode(pipe, z)).mean()) > 25
    finally:
        speed.clear()
