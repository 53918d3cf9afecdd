"""Zarr volumes: chunks written by hand must read back through zarr exactly."""
import numpy as np
import pytest
import zarr

from spinestream.shards.volumes import open_volume, set_attrs, write_volume


@pytest.mark.parametrize("cname,shuffle", [("lz4", "bitshuffle"), ("zstd", "noshuffle")])
@pytest.mark.parametrize("shape", [(19, 24, 20), (8, 16, 16), (3, 10, 12, 3)])
def test_roundtrip_through_zarr(tmp_path, cname, shuffle, shape):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 256, shape, dtype=np.uint8)
    vol[:, :4] = 0  # edge chunks and fill values
    write_volume(tmp_path / "tmp", tmp_path / "v" / "1.2.3", vol, {"z": [1.0, 2.0]}, chunk_depth=8,
                 cname=cname, shuffle=shuffle)
    assert not (tmp_path / "tmp").exists()
    arr = zarr.open_array(str(tmp_path / "v" / "1.2.3"), mode="r")
    assert arr.shape == vol.shape and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[...], vol)
    k = min(5, shape[0] - 1)
    np.testing.assert_array_equal(arr[k], vol[k])
    assert arr.attrs["z"] == [1.0, 2.0]


def test_attrs_update_and_errors(tmp_path):
    write_volume(tmp_path / "t", tmp_path / "v" / "s", np.zeros((2, 4, 4), np.uint8), {"a": 1})
    set_attrs(tmp_path / "v" / "s", {"slice_id_offset": 7})
    v = open_volume(tmp_path / "v", "s")
    assert v.attrs["slice_id_offset"] == 7 and v.attrs["a"] == 1
    with pytest.raises(FileNotFoundError, match="no volume"):
        open_volume(tmp_path / "v", "missing")
    with pytest.raises(ValueError, match="uint8"):
        write_volume(tmp_path / "t", tmp_path / "v" / "x", np.zeros((2, 4, 4), np.float32), {})
