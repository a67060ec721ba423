import numpy as np
import pytest
from omegaconf import OmegaConf

from ich.data.windows import WINDOWS, Window, parse_windows, window_stack


def test_brain_window_maps_its_range_to_unit_interval_and_clips_outside():
    hu = np.array([-1024, -100, 0, 20, 40, 60, 80, 200, 3071], dtype=np.float32)
    out = Window(*WINDOWS["brain"])(hu)
    np.testing.assert_allclose(out, [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1], atol=1e-6)
    assert out.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.int16, np.float64])
def test_window_output_is_float32_whatever_the_input_dtype(dtype):
    hu = np.array([[0, 40], [80, 120]], dtype=dtype)
    out = Window(40, 80)(hu)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0.5], [1, 1]])


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


def test_window_stack_gives_one_float32_channel_per_window():
    hu = np.random.default_rng(0).uniform(-1024, 3071, (24, 32)).astype(np.float32)
    windows = parse_windows(["brain", "subdural", "bone"])
    stack = window_stack(hu, windows)
    assert stack.shape == (24, 32, 3) and stack.dtype == np.float32
    for channel, window in enumerate(windows):
        np.testing.assert_array_equal(stack[..., channel], window(hu))
    assert 0.0 <= stack.min() and stack.max() <= 1.0


def test_window_stack_fills_the_given_buffer():
    hu = np.zeros((8, 8), dtype=np.float32)
    out = np.full((8, 8, 2), np.nan, dtype=np.float32)
    assert window_stack(hu, parse_windows(["brain", "bone"]), out=out) is out
    np.testing.assert_allclose(out[..., 0], 0.0)
    np.testing.assert_allclose(out[..., 1], (0 - (600 - 1400)) / 2800)


def test_window_stack_rejects_a_buffer_of_the_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        window_stack(np.zeros((8, 8), np.float32), [Window(40, 80)], out=np.empty((8, 8, 3), np.float32))
