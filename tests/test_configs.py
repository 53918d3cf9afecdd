"""Configs that travel (issue 17): ``-c NAME`` finds a shipped config from any directory, paths in a YAML
file are relative to that file, and ``spinestream configs`` lists, shows and copies the shipped ones."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spinestream.cli import main
from spinestream.config import PipelineConfig
from spinestream.engine.config import RunConfig
from spinestream.shards.config import SHIPPED_DIR, ConfigError, load_config, shipped_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory that is not the checkout."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_the_shipped_configs_are_the_packages_yaml_files():
    assert SHIPPED_DIR == ROOT / "configs"
    assert set(shipped_configs()) == {p.stem for p in (ROOT / "configs").glob("*.yaml")} >= {
        "pipeline", "round1", "round2", "demo", "demo-round1", "demo-round2", "shard"}


def test_a_shipped_config_loads_by_name_from_any_directory(elsewhere):
    rc = load_config(RunConfig, "round1", ["data.root=shards"])
    assert rc.name == "round1" and rc.model.name == "tf_efficientnetv2_s"
    assert rc.data.root == "shards" and rc.out_dir == "runs"  # a shipped config's paths: the current directory's
    pc = load_config(PipelineConfig, "pipeline")
    assert (pc.shard.config, pc.round1.config, pc.round2.config) == ("shard", "round1", "round2")
    assert load_config(PipelineConfig, "demo").round1.config == "demo-round1"


def test_the_pipeline_resolves_its_stage_configs_by_name_from_any_directory(elsewhere):
    from spinestream.plan import build_stages

    stages = build_stages(load_config(PipelineConfig, "pipeline"), elsewhere / "out", verb=lambda argv: 0)
    assert [s.name for s in stages][:4] == ["shard", "verify", "bench", "round1"]
    stages = build_stages(load_config(PipelineConfig, "demo"), elsewhere / "demo", verb=lambda argv: 0)
    assert stages[0].name == "synth"


def test_paths_in_a_yaml_file_are_relative_to_it(tmp_path, elsewhere):
    d = tmp_path / "exp"
    d.mkdir()
    (d / "run.yaml").write_text("name: r\nout_dir: ../runs\ndata:\n  root: shards\n"
                                "model:\n  init_from: /abs/best.pt\n  pretrained_path: w.safetensors\n")
    rc = load_config(RunConfig, d / "run.yaml")
    assert rc.out_dir == str(tmp_path / "runs") and rc.data.root == str(d / "shards")
    assert rc.model.init_from == "/abs/best.pt" and rc.model.pretrained_path == str(d / "w.safetensors")
    assert rc.data.label_tables == ["labels/truth.parquet"]  # not a path field: relative to data.root
    # --set values stay relative to the current directory
    assert load_config(RunConfig, d / "run.yaml", ["data.root=here"]).data.root == "here"


def test_a_pipeline_yaml_resolves_paths_and_finds_stage_configs_beside_it(tmp_path, elsewhere):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "round1.yaml").write_text("name: round1\n")
    (d / "p.yaml").write_text("out: out\nshard:\n  data: raw\n  config: shard\nround1:\n  config: round1\n"
                              "predict:\n  images: '{out}/raw/test_images'\n  sample_submission: data/s.csv\n")
    pc = load_config(PipelineConfig, d / "p.yaml")
    assert pc.out == str(d / "out") and pc.shard.data == str(d / "raw")
    assert pc.round1.config == str(d / "round1.yaml")  # the copy beside it wins over the shipped round1
    assert pc.shard.config == "shard" and pc.round2.config == "round2"  # none beside it: the shipped one
    assert pc.predict.images == "{out}/raw/test_images"  # a template stays one
    assert pc.predict.sample_submission == str(d / "data/s.csv")


def test_print_config_output_loads_the_same_from_anywhere(tmp_path, elsewhere, capsys):
    assert main(["run", "-c", "pipeline", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["shard"]["data"] == str(elsewhere / "rsna-2022-cervical-spine-fracture-detection")
    (tmp_path / "saved.yaml").write_text(text)
    assert main(["run", "-c", str(tmp_path / "saved.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text


def test_an_unknown_name_is_one_line_listing_the_shipped_ones(elsewhere, capsys):
    with pytest.raises(ConfigError, match="no shipped config of that name .shipped: demo-round1, "):
        load_config(RunConfig, "round3")
    assert main(["run", "-c", "round3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spinestream run: -c round3: ") and "pipeline, round1" in err and err.count("\n") == 1
    assert main(["run", "-c", "nowhere/p.yaml"]) == 2  # a / makes it a path: the file is missing
    assert capsys.readouterr().err == "spinestream run: config file nowhere/p.yaml does not exist\n"


def test_an_existing_file_without_a_suffix_is_a_path_but_a_directory_is_not(elsewhere):
    (elsewhere / "demo").mkdir()  # spinestream demo --dir demo
    assert load_config(PipelineConfig, "demo").synth.studies == 256
    (elsewhere / "round1").write_text("name: mine\n")
    assert load_config(RunConfig, "round1").name == "mine"


def test_configs_lists_shows_and_copies(tmp_path, elsewhere, capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split()[0]: line for line in lines if line and not line.startswith("-c ")}
    assert set(by_name) == set(shipped_configs())
    assert "The reference pipeline on the real data" in by_name["pipeline"]  # the YAML's first comment line
    assert main(["configs", "show", "round2"]) == 0
    assert capsys.readouterr().out == (ROOT / "configs/round2.yaml").read_text()

    to = tmp_path / "copies"
    assert main(["configs", "copy", "pipeline", "round1", "--to", str(to)]) == 0
    assert sorted(p.name for p in to.iterdir()) == ["pipeline.yaml", "round1.yaml"]
    (to / "round1.yaml").write_text("name: edited\n")
    capsys.readouterr()
    assert main(["configs", "copy", "--all", "--to", str(to)]) == 2  # never overwrites without --force
    assert "round1.yaml" in capsys.readouterr().err and (to / "round1.yaml").read_text() == "name: edited\n"
    assert not (to / "shard.yaml").exists()  # refused as a whole: nothing copied
    assert main(["configs", "copy", "--all", "--to", str(to), "--force"]) == 0
    assert {p.stem for p in to.glob("*.yaml")} == set(shipped_configs())
    assert (to / "round1.yaml").read_text() == (ROOT / "configs/round1.yaml").read_text()


def test_configs_refuses_an_unknown_name(tmp_path, elsewhere, capsys):
    assert main(["configs", "show", "round3"]) == 2
    assert capsys.readouterr().err.startswith("spinestream configs: no shipped config named round3 (shipped: ")
    assert main(["configs", "copy", "round1", "round3", "--to", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_demo_defaults_to_the_shipped_demo_from_any_directory(elsewhere, monkeypatch):
    from spinestream import demo, run

    seen = []
    monkeypatch.setattr(run, "main", lambda argv: seen.append(argv) or 0)
    assert demo.main([]) == 0
    argv = seen[0]
    assert argv[:4] == ["-c", "demo", "--out", "demo-data"]
    assert load_config(PipelineConfig, argv[1], argv[5::2]).synth.studies == 256
