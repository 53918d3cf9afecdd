"""2.5D sample construction and windowing."""
import numpy as np

from spinestream.preprocess.window import make_slice_fn, window_u8
from spinestream.shards.sample import decode_jpeg, encode_jpeg, neighbour_index, sample_image


def test_window_endpoints():
    hu = np.array([[-1000.0, -500.0, 400.0, 1300.0, 3000.0]], dtype=np.float32)
    out = window_u8(hu, 400, 1800)
    assert out.tolist() == [[0, 0, 128, 255, 255]]


def test_neighbours_by_millimetres():
    # the same 1 mm offset is 1 slice at 1 mm and 2 slices at 0.5 mm
    for dz, step in ((1.0, 1), (0.5, 2)):
        z = 100 - dz * np.arange(20)
        nb = neighbour_index(z, 1.0)
        assert nb[10].tolist() == [10 - step, 10, 10 + step]
    # at the ends, the slice itself stands in for the missing neighbour
    nb = neighbour_index(100 - np.arange(5.0), 1.0)
    assert nb[0].tolist() == [0, 0, 1] and nb[4].tolist() == [3, 4, 4]
    assert neighbour_index(np.array([5.0]), 1.0).tolist() == [[0, 0, 0]]


def test_sample_image_and_jpeg():
    vol = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 100, 200)])
    nb = neighbour_index(np.array([2.0, 1.0, 0.0]), 1.0)
    img = sample_image(vol, 1, nb, "neighbours")
    assert img.shape == (32, 32, 3) and img[0, 0].tolist() == [10, 100, 200]
    back = decode_jpeg(encode_jpeg(img, 95))
    assert np.abs(back.astype(int) - img).max() <= 3  # 4:4:4 keeps channels apart


def test_slice_fn_resizes_and_stacks_windows():
    hu = np.full((64, 48), 400.0, np.float32)
    assert make_slice_fn([(400, 1800)], 32)(hu).shape == (32, 32)
    out = make_slice_fn([(80, 300), (400, 650), (500, 1800)], 32)(hu)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
