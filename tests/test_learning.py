"""Round 1 learns: the whole path (synth -> shard -> DALI CPU loader -> trainer -> study-level
validation from the Zarr volumes) beats the constant-prevalence baseline on held-out studies.

This is the check that labels, slice order, channels, loss and metric line up end to end: a label
shifted by a slice, volumes read feet-first against head-first labels, or a study rule that ignores
the slices would leave the model at or above the baseline. It uses the demo's recipe
(configs/demo-round1.yaml: test_resnet, positives oversampled 3x, enriched cohort mix, 3-4 mm
cracks) at 96 px on 160 studies, boxed cohort only, with crop/rotation/brightness-contrast
augmentation besides the flips, 24 epochs (1,080 steps): about a minute and a half on two cores
(the session fixture ``learned_round1``, shared with the pseudo-label quality test). With the
global-permutation loader the earlier 16-epoch flips-only recipe ended at 0.67-0.86x the baseline
over four runs (seed 0 on CI and here took different paths to about the same 0.47); this
one at 0.25-0.51x on seeds 0 and 1 (BENCHMARKS.md, "Round 1 learns"). The 0.8x bound leaves room
for machine-to-machine differences without letting a model that learned nothing pass.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from spinestream.engine import checkpoint as ck

pytestmark = pytest.mark.dali


@pytest.mark.timeout(900)  # its session fixture trains 1,080 steps (~131 s idle): a loaded 2-core machine
# slows torch's threads several-fold, and pytest's 300 s default then fails a correct run
def test_round1_beats_the_constant_baseline(learned_round1):
    _, shards, run_dir = learned_round1
    assert len(pd.read_parquet(Path(shards) / "studies.parquet").query("fold == 0")) >= 32  # enough held-out studies
    best = ck.load(run_dir / "best.pt")["best"]

    vals = [json.loads(line)["val"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"val"' in line]
    baseline = vals[-1]["constant_baseline"]
    assert 0.3 < baseline < 1.0
    # clearly below the baseline, and at the end of the run too (not one lucky validation)
    assert best["metric"] < 0.8 * baseline, (best, baseline, [v["competition_loss"] for v in vals])
    assert vals[-1]["competition_loss"] < 0.85 * baseline
    # the fracture detector ranks held-out studies well above chance
    any_row = next(r for r in vals[-1]["report"] if r["target"] == "patient_overall")
    assert any_row["auc"] > 0.7
