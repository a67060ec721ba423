"""Site augmentation (data.augment.site): each step changes the slice as its key says, on HU before windowing,
a seed gives the same slices again, and with it off the data are those of a config without it."""

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from ich import CONFIG_DIR
from ich.data.augment import SiteAugmentation, windowed_augment
from ich.data.dataset import DicomLoader, MemoryLoader, as_bytes
from ich.data.windows import Window, window_planes
from tests.conftest import make_datamodule

# Every step off: a test turns on the one it checks.
NOTHING = dict(p=1.0, window_center=0.0, window_width=0.0, noise=(0.0, 0.0), kernel_p=0.0, resolution_p=0.0,
               density_p=0.0, gamma=0.0, contrast=0.0)
BRAIN, SOFT = Window(40, 80), Window(40, 380)


def conf_augment() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "data" / "_common.yaml").augment)


def head_like(size: int = 64) -> np.ndarray:
    """int16 HU: air, a bone ring, brain at 30 HU with a 70 HU bleed and a sharp 1-pixel stripe pattern."""
    y, x = np.mgrid[:size, :size] - size / 2
    r = np.hypot(x, y)
    hu = np.full((size, size), -1000, np.int16)
    hu[r < size * 0.45] = 1000
    hu[r < size * 0.4] = 30
    hu[(np.abs(x - 5) < 4) & (np.abs(y) < 4)] = 70
    hu[size // 2 + 8 : size // 2 + 14, size // 2 - 10 : size // 2] += (np.arange(10) % 2 * 20).astype(np.int16)
    return hu


def look(rng_seed: int = 0, windows=(BRAIN,), **steps):
    return SiteAugmentation(**{**NOTHING, **steps}).draw(np.random.default_rng(rng_seed), windows)


def test_with_every_step_off_the_planes_are_plain_windowing():
    hu = head_like()
    assert all(np.array_equal(a, b) for a, b in zip(look(windows=(BRAIN, SOFT)).hu_planes(hu),
                                                    window_planes(hu, (BRAIN, SOFT))))


def test_a_share_p_of_items_gets_another_look_and_the_rest_train_as_the_home_site_gave_them():
    hu = head_like()
    draws = [SiteAugmentation(p=0.5).draw(np.random.default_rng(seed), (BRAIN, SOFT)) for seed in range(400)]
    home = [one for one in draws if one.windows == (BRAIN, SOFT)]  # a jittered window is never exactly the home one
    assert 160 <= len(home) <= 240  # 200 expected; a binomial SD is 10
    for one in home[:10]:
        assert all(np.array_equal(a, b) for a, b in zip(one.hu_planes(hu), window_planes(hu, (BRAIN, SOFT))))
    never = [SiteAugmentation(p=0.0).draw(np.random.default_rng(seed), (BRAIN,)) for seed in range(20)]
    assert all(np.array_equal(one.hu_planes(hu)[0], window_planes(hu, (BRAIN,))[0]) for one in never)


def test_window_jitter_moves_centre_and_width_within_their_ranges_and_windows_the_hu_with_them():
    hu = head_like()
    drawn = [look(seed, windows=(BRAIN, SOFT), window_center=10, window_width=0.2) for seed in range(50)]
    for one in drawn:
        for plain, moved in zip((BRAIN, SOFT), one.windows):
            assert abs(moved.center - plain.center) <= 10 and abs(moved.width / plain.width - 1) <= 0.2
        assert all(np.array_equal(a, b) for a, b in zip(one.hu_planes(hu), window_planes(hu, one.windows)))
    centres = np.array([one.windows[0].center for one in drawn])
    assert centres.std() > 3  # spread over the range, not one value


NARROW = (Window(40, 100),)  # 100 HU onto 255 grey levels: fine enough for 2 HU of noise


def noise_sd(one, size: int) -> float:
    """SD in HU of the noise `one` leaves on a uniform 40 HU slice of `size` pixels (in NARROW: +-6 SD of 8 HU)."""
    (plane,) = one.hu_planes(np.full((size, size), 40, np.int16))
    return float(plane.std()) * NARROW[0].width / 255


def test_hu_noise_ends_with_the_drawn_sd_even_when_the_kernel_sharpens():
    wide = NARROW
    assert noise_sd(look(noise=(8.0, 8.0), windows=wide), 512) == pytest.approx(8, rel=0.05)
    # an unsharp mask of weight 2 would raise white noise of 8 HU to about 17 HU if it came after the noise
    sharpened = look(noise=(8.0, 8.0), windows=wide, kernel_p=1.0, sharpen=(2.0, 2.0), blur=(0.0, 0.0))
    blurred = look(1, noise=(8.0, 8.0), windows=wide, kernel_p=1.0, sharpen=(0.0, 0.0), blur=(2.0, 2.0))
    assert sharpened.sharpen == 2.0 and blurred.blur == 2.0
    assert noise_sd(sharpened, 512) == pytest.approx(8, rel=0.05)
    assert noise_sd(blurred, 512) == pytest.approx(8, rel=0.05)


def test_hu_noise_is_stated_at_512_px_and_shrinks_with_the_slice_as_resizing_shrinks_a_scanners():
    """What a scanner's 8 HU of white noise becomes when the slice is read at 128 px (INTER_AREA, as the readers
    resize), measured on such noise itself, is what the augmentation adds at 128 px."""
    scanner = np.random.default_rng(3).normal(40, 8, (512, 512)).astype(np.float32)
    resized = cv2.resize(scanner, (128, 128), interpolation=cv2.INTER_AREA).std()
    assert resized == pytest.approx(2, rel=0.05)  # 4 x 4 pixels averaged: a quarter of the SD
    added = noise_sd(look(noise=(8.0, 8.0), windows=NARROW), 128)
    assert added == pytest.approx(resized, rel=0.05)


def test_the_kernel_blurs_or_sharpens():
    rng = np.random.default_rng(1)
    noisy = (30 + rng.normal(0, 10, (512, 512))).astype(np.int16)

    def detail(one) -> float:
        (plane,) = one.hu_planes(noisy)
        return float(np.abs(cv2.Laplacian(plane.astype(np.float32), cv2.CV_32F)).mean())

    plain = detail(look(windows=(SOFT,)))
    blurred = [one for one in (look(s, windows=(SOFT,), kernel_p=1.0) for s in range(20)) if one.blur]
    sharpened = [one for one in (look(s, windows=(SOFT,), kernel_p=1.0) for s in range(20)) if one.sharpen]
    assert blurred and sharpened  # either, with equal chance
    assert all(detail(one) < 0.7 * plain for one in blurred)
    assert all(detail(one) > 1.2 * plain for one in sharpened)


def test_the_kernel_is_stated_at_512_px_so_a_128_px_slice_gets_a_quarter_of_its_width():
    edge = np.where(np.arange(128) < 64, 1000, 30).astype(np.int16)[None, :].repeat(8, axis=0)
    one = look(1, windows=(Window(500, 1000),), kernel_p=1.0, blur=(2.0, 2.0), sharpen=(0.0, 0.0))
    assert one.blur == 2.0
    (plane,) = one.hu_planes(edge)
    # a Gaussian of sigma 2 * 128 / 512 = 0.5 px, sampled at whole pixels: weights exp(-2 k^2) = 1, 0.1353, 0.0003
    # (sum 1.2713); the pixel next to the edge takes (0.1353 + 0.0003) / 1.2713 = 10.7% from the bone side:
    # 30 + 0.107 * 970 = 133.5 HU, 34.0 grey levels of the 0-1000 HU window
    assert plane[4, 64] == pytest.approx(34.0, abs=1)


def test_the_blood_density_step_pulls_blood_towards_brain_and_leaves_the_rest():
    hu = np.array([[-1000, 0, 30, 35, 70, 90, 120, 150, 1000]], np.int16)
    one = look(windows=(Window(40, 4000),), density_p=1.0, density=(0.5, 0.5))
    assert one.density == 0.5
    # by hand: 70 HU keeps half its 35 HU over brain (52.5); 90 -> 62.5; 120 halfway back from 62.5 to 150
    expected = np.array([-1000, 0, 30, 35, 52.5, 62.5, 106.25, 150, 1000])
    window = Window(40, 4000)  # -1960 .. 2040 HU onto 0..255
    (plane,) = one.hu_planes(hu)
    np.testing.assert_allclose(plane[0], np.clip((expected - (40 - 2000)) / 4000 * 255, 0, 255), atol=0.6)
    assert window.center == 40
    bleed = look(windows=(BRAIN,), density_p=1.0, density=(0.4, 0.4)).hu_planes(head_like())[0]
    brain_level, bleed_level = window_planes(np.array([[30, 49]], np.int16), (BRAIN,))[0][0]  # 35 + 0.4 * 35 = 49
    assert bleed[32, 37] == bleed_level and bleed[10, 32] == brain_level


def test_the_resolution_step_loses_fine_detail_but_keeps_the_size():
    hu = head_like()
    stripes = (slice(40, 46), slice(22, 32))
    one = look(resolution_p=1.0, resolution=(0.5, 0.5), windows=(Window(40, 200),))
    (plane,) = one.hu_planes(hu)
    (sharp,) = window_planes(hu, (Window(40, 200),))
    assert plane.shape == hu.shape
    assert plane[stripes].std() < 0.5 * sharp[stripes].std()


def test_windowed_images_get_gamma_and_contrast_instead():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    strengths = SiteAugmentation(**{**NOTHING, "gamma": 0.5, "contrast": 0.2})
    draws = [strengths.draw(np.random.default_rng(seed), None) for seed in range(10)]
    for one in draws:
        assert one.windows is None and 0.8 <= one.contrast <= 1.2
        (plane,) = one.planes([ramp])
        expected = np.rint(np.clip(((ramp / 255) ** one.gamma - 0.5) * one.contrast + 0.5, 0, 1) * 255)
        np.testing.assert_array_equal(plane, expected.astype(np.uint8))
    assert {one.gamma > 1 for one in draws} == {True, False}  # darker or brighter mid-greys


def test_site_augmentation_reads_hu_and_is_reproducible_from_the_seed(cache_dir, tmp_path):
    augment = {**conf_augment(), "site": True}
    dm = make_datamodule(cache_dir, tmp_path, augment=augment)
    train = dm.datasets["train"]
    assert train.site is not None and dm.datasets["val"].site is None and dm.datasets["test"].site is None
    # small data sit in memory as HU, so the site augmentation still sees HU; val/test get the planes they always got
    assert isinstance(train.loader, MemoryLoader) and train.loader.windows == dm.windows
    dicom = DicomLoader(as_bytes(dm.index["path"]), dm.windows, dm.image_size)
    for row in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(train.loader(row), dicom(row)))
    first = [train.image(i, epoch=2) for i in range(4)]
    assert all(np.array_equal(a, train.image(i, epoch=2)) for i, a in enumerate(first))
    assert any(not np.array_equal(a, train.image(i, epoch=3)) for i, a in enumerate(first))
    plain = make_datamodule(cache_dir, tmp_path, augment=conf_augment()).datasets["train"]
    assert any(not np.array_equal(a, plain.image(i, epoch=2)) for i, a in enumerate(first))


def test_off_is_the_data_of_a_config_without_it(cache_dir, tmp_path):
    """data.augment.site=false gives byte for byte the slices of the data.augment keys this change found."""
    before = windowed_augment(conf_augment())
    assert not any(key.startswith("site") for key in before)
    off = make_datamodule(cache_dir, tmp_path, augment=conf_augment())
    old = make_datamodule(cache_dir, tmp_path, augment=before)
    assert off.site_augmentation is None
    assert isinstance(off.datasets["train"].loader, MemoryLoader) and off.datasets["train"].loader.windows is None
    for name in ("train", "test"):
        for i in range(len(off.datasets[name])):
            assert np.array_equal(off.datasets[name].image(i, epoch=1), old.datasets[name].image(i, epoch=1))


def test_all_slices_of_a_context_stack_share_one_scanner(cache_dir, tmp_path):
    augment = {**conf_augment(), "site": True, "site_noise": [0, 0], "site_kernel_p": 0, "site_resolution_p": 0}
    dm = make_datamodule(cache_dir, tmp_path, augment={**augment, "hflip": 0, "affine_p": 0, "blur_p": 0,
                                                       "brightness_contrast_p": 0}, context=1, windows=["brain"])
    train = dm.datasets["train"]
    i = next(i for i in range(len(train)) if len(set(train.stacks[i])) == 3)
    image = train.image(i, epoch=0)
    seed = int(np.random.SeedSequence([train.seed, 0, i]).generate_state(1)[0])  # (seed, epoch, item), as augmentation
    one = train.site.draw(np.random.default_rng(seed), dm.windows)
    expected = [window_planes(dm.datasets["train"].loader.hu(int(row)), one.windows)[0] for row in train.stacks[i]]
    np.testing.assert_array_equal(image, np.stack(expected, axis=-1))
