import os
import sys
from pathlib import Path

# the repo root on sys.path so tests run from a plain checkout too
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# wandb and friends must never reach the network from tests
os.environ.setdefault("WANDB_MODE", "offline")
