import os
import sys
from pathlib import Path

# the repo root on sys.path so tests run from a plain checkout too
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# wandb and friends must never reach the network from tests
os.environ.setdefault("WANDB_MODE", "offline")


import pytest  # noqa: E402

# the tiny shard set most tests share: 10 synthetic studies, 48 px, many small shards
CFG = dict(image_size=48, folds=2, shard_max_samples=40)


@pytest.fixture(scope="session")
def raw(tmp_path_factory) -> Path:
    from preprocess.synth import make_dataset

    d = tmp_path_factory.mktemp("raw")
    make_dataset(d, studies=10, seed=3, size=64, slices=(32, 40), test_studies=1)
    return d


@pytest.fixture(scope="session")
def shards(raw, tmp_path_factory) -> Path:
    from preprocess.config import ShardConfig
    from preprocess.convert import run

    out = tmp_path_factory.mktemp("shards") / "out"
    run(raw, out, ShardConfig(**CFG), workers=2)
    return out
