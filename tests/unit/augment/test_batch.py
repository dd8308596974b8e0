"""Batched on-device augmentation: shapes, per-image randomness, determinism and op correctness."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from stablerep_ray.augment.batch import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugment,
    blur_kernel_size,
    denormalize,
    eval_transform,
    make_generator,
    normalize,
)
from stablerep_ray.config import AugmentConfig

OFF = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _images(b=8, h=48, w=48, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g)


def _smooth_images(b=8, h=48, w=48, seed=0) -> torch.Tensor:
    """Colourful low-frequency images (random noise upsampled), so crops/colour ops are meaningful."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(b, 3, 6, 6, generator=g)
    x = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _unnorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


def test_output_shape_dtype_and_normalisation():
    aug = BatchAugment(AugmentConfig(), 32)
    out = aug(_images(), make_generator(0))
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    pix = _unnorm(out)
    assert pix.min() >= -1e-5 and pix.max() <= 1 + 1e-5

    # a constant image through a no-op pipeline maps to exactly (v/255 - mean) / std
    const = torch.full((2, 40, 40, 3), 200, dtype=torch.uint8)
    out = BatchAugment(AugmentConfig(crop_scale=(1.0, 1.0), **OFF), 16)(const, make_generator(0))
    expect = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expect.view(1, 3, 1, 1).expand_as(out), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        denormalize(normalize(torch.full((1, 3, 2, 2), 0.3))), torch.full((1, 3, 2, 2), 0.3)
    )


def test_numpy_input_and_empty_batch():
    aug = BatchAugment(AugmentConfig(), 24)
    imgs = _images(3)
    a = aug(imgs.numpy(), make_generator(1))
    b = aug(imgs, make_generator(1))
    torch.testing.assert_close(a, b)
    assert aug(torch.zeros(0, 30, 30, 3, dtype=torch.uint8)).shape == (0, 3, 24, 24)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        aug(torch.zeros(2, 3, 30, 30, dtype=torch.uint8))


def test_per_image_randomness():
    one = _smooth_images(1, 48, 48)
    batch = one.expand(6, -1, -1, -1).contiguous()
    out = BatchAugment(AugmentConfig(), 32)(batch, make_generator(0))
    for i in range(6):
        for j in range(i + 1, 6):
            assert (out[i] - out[j]).abs().max() > 1e-2, (i, j)
    params = BatchAugment(AugmentConfig(), 32).sample(64, 48, 48, make_generator(0))
    assert params.box.unique(dim=0).shape[0] == 64
    assert 0 < params.flip.sum() < 64 and 0 < params.blur.sum() < 64


def test_determinism_with_generator_seed_and_chunking():
    imgs = _smooth_images(10)
    aug = BatchAugment(AugmentConfig(), 32)
    a = aug(imgs, make_generator(123))
    b = aug(imgs, make_generator(123))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - aug(imgs, make_generator(124))).abs().max() > 1e-2
    chunked = BatchAugment(AugmentConfig(), 32, chunk_size=3)(imgs, make_generator(123))
    torch.testing.assert_close(a, chunked, atol=1e-6, rtol=0)


def test_full_crop_without_ops_equals_plain_resize():
    imgs = _images(4, 48, 48)
    aug = BatchAugment(AugmentConfig(crop_scale=(1.0, 1.0), **OFF), 32)
    out = aug(imgs, make_generator(0))
    x = imgs.permute(0, 3, 1, 2).float() / 255
    ref = normalize(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    # same size in and out: the identity
    same = BatchAugment(AugmentConfig(crop_scale=(1.0, 1.0), **OFF), 48)(imgs, make_generator(0))
    torch.testing.assert_close(same, normalize(x), atol=1e-4, rtol=0)


def test_crop_boxes_follow_torchvision_sampling():
    aug = BatchAugment(AugmentConfig(crop_scale=(0.2, 0.6)), 32)
    p = aug.sample(512, 60, 80, make_generator(0))
    top, left, h, w = p.box.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 60 + 1e-4).all() and (left + w <= 80 + 1e-4).all()
    area = h * w / (60 * 80)
    assert (area >= 0.2 - 1e-4).all() and (area <= 0.6 + 1e-4).all()
    ratio = w / h
    assert (ratio >= 3 / 4 - 1e-4).all() and (ratio <= 4 / 3 + 1e-4).all()
    # very wide image with a full-area scale: every try fails -> centre crop at the widest ratio
    p = BatchAugment(AugmentConfig(crop_scale=(1.0, 1.0)), 16).sample(4, 20, 100, make_generator(0))
    torch.testing.assert_close(p.box, torch.tensor([[0.0, (100 - 20 * 4 / 3) / 2, 20.0, 20 * 4 / 3]] * 4))


def test_flip_equals_torch_flip_of_unflipped():
    imgs = _smooth_images(6)
    cfg = dict(crop_scale=(0.3, 0.7), color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    plain = BatchAugment(AugmentConfig(flip_p=0.0, **cfg), 32)(imgs, make_generator(5))
    flipped = BatchAugment(AugmentConfig(flip_p=1.0, **cfg), 32)(imgs, make_generator(5))
    torch.testing.assert_close(flipped, torch.flip(plain, dims=[-1]), atol=1e-5, rtol=0)


def test_grayscale_p1_gives_equal_channels():
    imgs = _smooth_images(6)
    aug = BatchAugment(AugmentConfig(grayscale_p=1.0, blur_p=0.0), 32, normalize=False)
    out = aug(imgs, make_generator(0))
    assert (out[:, 0] - out[:, 1]).abs().max() < 1e-6 and (out[:, 1] - out[:, 2]).abs().max() < 1e-6
    normed = BatchAugment(AugmentConfig(grayscale_p=1.0, blur_p=0.0), 32)(imgs, make_generator(0))
    pix = _unnorm(normed)
    assert (pix[:, 0] - pix[:, 2]).abs().max() < 1e-5


def _high_freq_energy(x: torch.Tensor) -> torch.Tensor:
    """Per-image energy of the discrete Laplacian (a high-pass filter)."""
    lap = x[..., 1:-1, 1:-1] * 4 - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.pow(2).mean((1, 2, 3))


def test_blur_reduces_high_frequency_energy():
    imgs = _images(8, 32, 32)
    cfg = dict(crop_scale=(1.0, 1.0), flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0)
    sharp = BatchAugment(AugmentConfig(blur_p=0.0, **cfg), 32)(imgs, make_generator(0))
    blurred = BatchAugment(AugmentConfig(blur_p=1.0, blur_sigma=(0.8, 2.0), **cfg), 32)(
        imgs, make_generator(0)
    )
    e_sharp, e_blur = _high_freq_energy(sharp), _high_freq_energy(blurred)
    assert (e_blur < 0.5 * e_sharp).all()
    # a constant image is unchanged by blurring (normalised kernels, reflect padding)
    const = torch.full((2, 32, 32, 3), 90, dtype=torch.uint8)
    a = BatchAugment(AugmentConfig(blur_p=1.0, **cfg), 32)(const, make_generator(0))
    b = BatchAugment(AugmentConfig(blur_p=0.0, **cfg), 32)(const, make_generator(0))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(64) == 7 and blur_kernel_size(16) == 3


def test_ops_match_torchvision_per_image():
    """With an identity crop, jitter/blur with the drawn per-image params equal torchvision's ops."""
    imgs = _smooth_images(6, 32, 32)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), flip_p=0.0, color_jitter_p=1.0, grayscale_p=0.0, blur_p=1.0)
    aug = BatchAugment(cfg, 32, normalize=False)
    p = aug.sample(6, 32, 32, make_generator(7))
    out = aug.apply(imgs, p)
    x = imgs.permute(0, 3, 1, 2).float() / 255
    k = aug.kernel_size
    for i in range(6):  # reference only: the implementation itself is vectorised
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        y = x[i]
        for op in p.order[i].tolist():  # each image's own order, as torchvision's ColorJitter
            y = ops[op](y, p.factors[i, op].item())
        sigma = float(p.sigma[i])
        y = TF.gaussian_blur(y, [k, k], [sigma, sigma])
        torch.testing.assert_close(out[i], y, atol=2e-4, rtol=0)


def test_works_under_autocast_and_stays_float32():
    imgs = _smooth_images(4)
    aug = BatchAugment(AugmentConfig(), 32)
    ref = aug(imgs, make_generator(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(imgs, make_generator(3))
        ev = eval_transform(imgs, 32)
    assert out.dtype == torch.float32 and ev.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_eval_transform_shapes_and_centre_crop():
    # 256 -> 224: shorter side already round(224 / 0.875) = 256, so a pure centre crop
    big = _images(2, 256, 300)
    out = eval_transform(big, 224)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    x = big.permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(out, normalize(x[:, :, 16:240, 38:262]), atol=1e-6, rtol=0)

    # larger images: resize shorter side to 256 first (aspect kept), then centre crop
    large = _smooth_images(2, 320, 400)
    out = eval_transform(large, 224)
    xl = large.permute(0, 3, 1, 2).float() / 255
    resized = F.interpolate(xl, size=(256, 320), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out, normalize(resized[:, :, 16:240, 48:272]), atol=1e-5, rtol=0)

    # small images (shorter side below S / 0.875): resize shorter side to S, then centre crop
    small = _smooth_images(3, 48, 60)
    out = eval_transform(small.numpy(), 64)  # numpy input is converted
    assert out.shape == (3, 3, 64, 64)
    xs = small.permute(0, 3, 1, 2).float() / 255
    resized = F.interpolate(xs, size=(64, 80), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out, normalize(resized[:, :, :, 8:72]), atol=1e-5, rtol=0)

    # exactly S: the identity
    same = _images(2, 64, 64)
    torch.testing.assert_close(
        eval_transform(same, 64), normalize(same.permute(0, 3, 1, 2).float() / 255), atol=1e-6, rtol=0
    )


def test_timing_sanity_cpu():
    """256 images at 64px in well under a second on one CPU thread.

    Timed single-threaded: a shared, busy CI machine makes multi-threaded OpenMP timings erratic.
    """
    imgs = _images(256, 64, 64)
    aug = BatchAugment(AugmentConfig(), 64)
    g = make_generator(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        aug(imgs, g)  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            out = aug(imgs, g)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (256, 3, 64, 64)
    assert best < 1.0, f"augmenting 256 images at 64px took {best:.3f}s"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    imgs = _smooth_images(8)
    aug = BatchAugment(AugmentConfig(), 32)
    cpu = aug(imgs, make_generator(9))
    gpu = aug(imgs.cuda(), make_generator(9))  # CPU generator: same draws, moved to the device
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)
    out = aug(imgs.cuda(), make_generator(9, "cuda"))
    assert out.shape == (8, 3, 32, 32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert aug(imgs.cuda()).dtype == torch.float32


def test_jitter_order_is_drawn_per_image_or_fixed():
    random_order = BatchAugment(AugmentConfig(), 32).sample(64, 32, 32, make_generator(0)).order
    assert sorted(random_order[0].tolist()) == [0, 1, 2, 3]
    assert len({tuple(row) for row in random_order.tolist()}) > 5, "orders differ between images"
    fixed = BatchAugment(AugmentConfig(jitter_order="fixed"), 32).sample(8, 32, 32, make_generator(0)).order
    assert fixed.tolist() == [[0, 1, 2, 3]] * 8


def test_downsampling_resizes_down_and_back_before_the_crop():
    imgs = _images(4, 32, 32)
    cfg = dict(crop_scale=(1.0, 1.0), **OFF)
    low = BatchAugment(AugmentConfig(downsample_p=1.0, downsample_sizes=[8], **cfg), 32, normalize=False)
    out = low(imgs, make_generator(1))
    x = imgs.permute(0, 3, 1, 2).float() / 255
    small = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, F.interpolate(small, size=(32, 32), mode="bilinear"), atol=1e-5, rtol=0)
    # sizes not below the image are skipped; p = 0 leaves every image alone
    plain = BatchAugment(AugmentConfig(downsample_p=0.0, **cfg), 32, normalize=False)(imgs, make_generator(1))
    skipped = BatchAugment(AugmentConfig(downsample_p=1.0, downsample_sizes=[64], **cfg), 32, normalize=False)
    torch.testing.assert_close(skipped(imgs, make_generator(1)), plain)
    assert not torch.allclose(out, plain)


def test_solarize_inverts_the_bright_values_of_the_images_that_draw_it():
    imgs = _images(64, 16, 16)
    cfg = dict(crop_scale=(1.0, 1.0), downsample_p=0.0, **OFF)
    plain = BatchAugment(AugmentConfig(**cfg), 16, normalize=False)(imgs, make_generator(2))
    out = BatchAugment(AugmentConfig(solarize_p=0.5, **cfg), 16, normalize=False)(imgs, make_generator(2))
    solarized = ~torch.isclose(out, plain).flatten(1).all(1)
    assert 16 < solarized.sum() < 48, "about half the images"
    expected = torch.where(plain >= 0.5, 1.0 - plain, plain)
    torch.testing.assert_close(out[solarized], expected[solarized])
    torch.testing.assert_close(out[~solarized], plain[~solarized])


def test_multicrop_gives_each_image_one_global_crop_of_each_recipe():
    from stablerep_ray.augment import MultiCrop

    imgs = torch.full((32, 16, 16, 3), 204, dtype=torch.uint8)  # 0.8 everywhere: solarized to 0.2
    plain = AugmentConfig(crop_scale=(1.0, 1.0), downsample_p=0.0, **OFF)
    solarize = plain.model_copy(update={"solarize_p": 1.0})
    crops = MultiCrop([solarize, plain], 16, 2, plain, 8, 1)(imgs, make_generator(3))
    level = denormalize(crops.global_crops).mean((1, 2, 3)).view(2, 32)  # (crop, image)
    is_solarized = level < 0.5
    assert torch.equal(is_solarized[0], ~is_solarized[1]), "one crop of each recipe per image"
    assert 4 < is_solarized[0].sum() < 28, "the first crop's recipe is drawn per image"
    assert crops.local_crops.shape == (32, 3, 8, 8)
