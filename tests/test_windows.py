import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ich.data.windows import WINDOWS, Window, parse_windows, to_unit_float, window_stack


def test_brain_window_maps_its_range_to_0_255_and_clips_outside():
    hu = np.array([-1024, -100, 0, 20, 40, 60, 80, 200, 3071], dtype=np.int16)
    out = Window(*WINDOWS["brain"])(hu)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 0, 0, 64, 128, 191, 255, 255, 255])


@pytest.mark.parametrize("window", [(40, 80), (80, 200), (600, 2800), (40, 75), (40.5, 80), (-3.25, 7)])
def test_every_whole_hu_is_windowed_to_the_nearest_level(window):
    """Integral low edges take the fast clamp-and-scale path, fractional ones the general one: both round to nearest."""
    hu = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)  # every int16, extremes included
    center, width = window
    exact = np.clip((hu - (center - width / 2)) * 255 / width, 0, 255)
    out = Window(center, width)(hu)
    assert np.abs(out - exact).max() <= 0.5 + 1e-6  # ties may round either way
    assert out[0] == 0 and out[-1] == 255


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_other_dtypes_are_rounded_to_whole_hu_first(dtype):
    hu = np.array([[0, 40.4], [79.6, 120]], dtype=dtype)
    out = Window(40, 80)(hu)
    assert out.dtype == np.uint8 and out.shape == (2, 2)
    np.testing.assert_array_equal(out, Window(40, 80)(np.rint(hu).astype(np.int16)))


def test_window_rejects_non_positive_width():
    with pytest.raises(ValueError, match="width"):
        Window(40, 0)


def test_parse_windows_accepts_names_and_center_width_pairs():
    windows = parse_windows(["brain", [600, 2800], "subdural"])
    assert windows == [Window(40, 80), Window(600, 2800), Window(80, 200)]


def test_parse_windows_accepts_an_omegaconf_list():
    spec = OmegaConf.create({"windows": ["brain", [40, 380]]}).windows
    assert parse_windows(spec) == [Window(40, 80), Window(40, 380)]


def test_unknown_window_name_says_which_names_exist():
    with pytest.raises(ValueError) as err:
        parse_windows(["brain", "brian"])
    assert str(err.value) == (
        "Unknown window 'brian' in data.windows: use one of brain, subdural, soft, bone or a [center, width] pair."
    )


@pytest.mark.parametrize("spec", [[[40, -80]], [[40]], [["a", "b"]], []])
def test_parse_windows_rejects_bad_pairs_and_empty_lists(spec):
    with pytest.raises(ValueError):
        parse_windows(spec)


def test_window_stack_gives_one_uint8_channel_per_window():
    hu = np.random.default_rng(0).integers(-1024, 3071, (24, 32)).astype(np.int16)
    windows = parse_windows(["brain", "subdural", "bone"])
    stack = window_stack(hu, windows)
    assert stack.shape == (24, 32, 3) and stack.dtype == np.uint8
    for channel, window in enumerate(windows):
        np.testing.assert_array_equal(stack[..., channel], window(hu))


def test_to_unit_float_maps_levels_to_0_1_and_leaves_floats_alone():
    levels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    torch.testing.assert_close(to_unit_float(levels), torch.tensor([0.0, 0.2, 1.0]))
    floats = torch.rand(3)
    assert to_unit_float(floats) is floats
