"""webdataset earns its place: a plain ``webdataset.WebDataset`` pipeline reads every sample of the
written shards as ``jpg`` + ``id`` (the README recipe), the same slices the slice table lists, shard
by shard."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import webdataset as wds

from spinestream.shards.layout import Layout
from spinestream.shards.sample import decode_jpeg
from spinestream.shards.wds import iter_samples


def _slice_id(data: bytes) -> int:
    return int.from_bytes(data, "little")  # .id: the slice_id as int64 little-endian


def _tars(root) -> list[str]:
    tars = sorted(str(p) for p in Layout(root).wds.glob("*.tar"))
    assert tars, f"no shards under {root}"
    return tars


def test_webdataset_reads_every_sample_as_jpg_and_id(shards):
    tars = _tars(shards)
    # the README recipe: a custom .id handler before the image handler (webdataset's default would
    # parse .id as decimal text)
    ds = (wds.WebDataset(tars, shardshuffle=False)
          .decode(wds.handle_extension("id", _slice_id), "rgb8")
          .to_tuple("jpg", "id"))
    images, ids = [], []
    for img, slice_id in ds:
        images.append(img)
        ids.append(slice_id)
    slices = pd.read_parquet(Layout(shards).slices)
    assert sorted(ids) == sorted(slices.slice_id.tolist())  # every slice exactly once
    assert len(set(ids)) == len(ids)
    size = images[0].shape[0]
    assert all(im.dtype == np.uint8 and im.shape == (size, size, 3) for im in images)
    # the decoded jpg is the image the project's own reader decodes
    first_id, first_jpeg = next(iter_samples(tars[0]))
    assert ids[0] == first_id
    assert np.array_equal(images[0], decode_jpeg(first_jpeg))


def test_webdataset_keys_and_shards_match_the_slice_table(shards):
    slices = pd.read_parquet(Layout(shards).slices).set_index("slice_id")
    seen = 0
    for sample in wds.WebDataset(_tars(shards), shardshuffle=False):
        slice_id = _slice_id(sample["id"])
        assert sample["__key__"] == f"{slice_id:09d}"  # the key is the slice_id, no dots
        shard = sample["__url__"].rsplit("/", 1)[1].removesuffix(".tar")
        assert slices.loc[slice_id, "shard"] == shard
        assert {k for k in sample if not k.startswith("__")} == {"jpg", "id"}  # nothing else per sample
        seen += 1
    assert seen == len(slices)


def test_shuffled_pipeline_is_a_permutation(shards):
    tars = _tars(shards)
    ds = (wds.WebDataset(tars, shardshuffle=len(tars), seed=0)
          .shuffle(64, seed=0)
          .decode(wds.handle_extension("id", _slice_id), "rgb8")
          .to_tuple("jpg", "id"))
    ids = [i for _, i in ds]
    in_order = [_slice_id(s["id"]) for s in wds.WebDataset(tars, shardshuffle=False)]
    assert sorted(ids) == sorted(in_order) and ids != in_order


def test_default_decoder_cannot_read_the_binary_id():
    # why the recipe needs its own .id handler: webdataset's default reads .id as decimal text
    with pytest.raises(ValueError):
        wds.autodecode.decoders["id"]((1).to_bytes(8, "little"))
