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
    from spinestream.preprocess.synth import make_dataset

    d = tmp_path_factory.mktemp("raw")
    make_dataset(d, studies=10, seed=3, size=64, slices=(32, 40), test_studies=1)
    return d


@pytest.fixture(scope="session")
def shards(raw, tmp_path_factory) -> Path:
    from spinestream.preprocess.convert import shard_dataset
    from spinestream.shards.shard_config import ShardConfig

    out = tmp_path_factory.mktemp("shards") / "out"
    shard_dataset(raw, out, ShardConfig(**CFG), workers=2)
    return out


# the one trained round-1 run the learning test and the pseudo-label quality test share (~1 min on 2 cores)
LEARN_SIZE = 96


@pytest.fixture(scope="session")
def learned_round1(tmp_path_factory):
    """The demo's recipe (configs/demo-round1.yaml: test_resnet, positives oversampled 3x) on 160 enriched
    synthetic studies (half boxed, 3-4 mm cracks) at 96 px, boxed cohort only, with random resized crop,
    rotation and brightness/contrast at p=0.3 besides the flips (on 60 training studies the flips alone
    overfit), 24 epochs (1,080 steps), validated every 6 epochs: (raw dir, shard dir, run dir).
    BENCHMARKS.md, "Round 1 learns", has the runs that chose it."""
    from spinestream.engine import checkpoint as ck
    from spinestream.engine.config import RunConfig
    from spinestream.engine.rundir import write_config
    from spinestream.engine.trainer import Trainer
    from spinestream.preprocess.convert import shard_dataset
    from spinestream.preprocess.synth import make_dataset
    from spinestream.shards.config import load_config
    from spinestream.shards.shard_config import ShardConfig

    raw = tmp_path_factory.mktemp("learn-raw")
    make_dataset(raw, studies=160, seed=0, size=LEARN_SIZE, slices=(16, 24), test_studies=0, syntax="explicit",
                 boxed_share=0.5, crack_width=(3.0, 4.0), workers=2)
    out = tmp_path_factory.mktemp("learn-shards") / "out"
    shard_dataset(raw, out, ShardConfig(image_size=LEARN_SIZE, folds=4), workers=2)
    runs = tmp_path_factory.mktemp("learn-runs")
    cfg = load_config(RunConfig, str(ROOT / "configs/demo-round1.yaml"), [
        f"data.root={out}", f"out_dir={runs}", "name=round1", f"loader.image_size={LEARN_SIZE}",
        "data.train_cohorts=[boxed]", "train.epochs=24", "train.val_every_epochs=6", "log.wandb=disabled",
        "loader.augment.p_crop=0.3", "loader.augment.p_rotate=0.3", "loader.augment.p_brightness_contrast=0.3",
        "train.checkpoint_every_steps=100000",
    ])
    run_dir = runs / "round1"
    ck.mark_run(run_dir)
    write_config(run_dir, cfg)  # as `spinestream train`
    Trainer(cfg, run_dir).fit()
    return raw, out, run_dir
