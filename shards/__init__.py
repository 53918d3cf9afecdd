"""The storage contract between ``preprocess`` (writer) and ``engine`` (reader).

Owns both sides of every format: WebDataset tar + DALI ``.idx`` files, Zarr volumes,
the manifest, slice/study tables and label tables. See ../shared/DESIGN.md.
"""
