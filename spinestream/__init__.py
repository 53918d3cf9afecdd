"""spinestream: the application layer on top of preprocess, engine, benchmarks and shards.

The console script's verb table (:mod:`spinestream.cli`) and the demo live here; it is the
only package that may import all the others (DESIGN.md, "Layout").
"""

__version__ = "0.1.0"
