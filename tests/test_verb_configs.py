"""Issue 18: evaluate, pseudo-label and predict take typed configs (``-c``, ``--set``, ``--print-config``) whose
fields are also their flags, declared once (spinestream.shards.config.add_config_arguments). No model is
loaded here: ``--print-config`` stops before, and the errors come from the config."""
from __future__ import annotations

import dataclasses
import functools

import pytest

from spinestream.engine.evaluate import EvaluateConfig, main as evaluate
from spinestream.engine.pseudo import PseudoLabelConfig, main as pseudo
from spinestream.predict import PredictConfig, main as predict
from spinestream.shards.config import ConfigError, config_from_args, field_docs, load_config, plain, verb_parser

evaluate_parser = functools.partial(verb_parser, EvaluateConfig, "spinestream evaluate", None)
pseudo_parser = functools.partial(verb_parser, PseudoLabelConfig, "spinestream pseudo-label", None)
predict_parser = functools.partial(verb_parser, PredictConfig, "spinestream predict", None)
VERBS = [(EvaluateConfig, evaluate, evaluate_parser), (PseudoLabelConfig, pseudo, pseudo_parser),
         (PredictConfig, predict, predict_parser)]
IDS = ["evaluate", "pseudo-label", "predict"]


@pytest.mark.parametrize("cls,main,parser", VERBS, ids=IDS)
def test_print_config_round_trips_through_c(cls, main, parser, tmp_path, capsys):
    assert main(["--run", "runs/r1", "--batch-size", "5", "--print-config"]) == 0
    text = capsys.readouterr().out
    cfg = load_config(cls, _write(tmp_path / "c.yaml", text))
    assert cfg.batch_size == 5 and cfg.run == (["runs/r1"] if cls is PredictConfig else "runs/r1")
    assert main(["-c", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("cls,main,parser", VERBS, ids=IDS)
def test_every_scalar_field_is_a_flag_with_its_docstring_as_help(cls, main, parser):
    text = " ".join(parser().format_help().split())
    for f in dataclasses.fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in text, flag
        assert " ".join(plain(field_docs(cls)[f.name]).split()).removesuffix(".")[:30] in text, f.name


@pytest.mark.parametrize("cls,main,parser", VERBS, ids=IDS)
def test_flag_beats_set_beats_file_beats_default(cls, main, parser, tmp_path):
    path = _write(tmp_path / "c.yaml", "batch_size: 8\ncheckpoint: last\n")

    def cfg(*argv: str):
        return config_from_args(cls, parser().parse_args(list(argv)))

    assert cfg().batch_size == cls().batch_size  # the default
    assert cfg("-c", path).batch_size == 8
    assert cfg("-c", path, "--set", "batch_size=16").batch_size == 16
    got = cfg("-c", path, "--set", "batch_size=16", "--batch-size", "24")
    assert (got.batch_size, got.checkpoint) == (24, "last")  # a flag overrides its field only


def test_list_and_bool_flags(tmp_path):
    path = _write(tmp_path / "c.yaml", "run: [a, b]\ntta: true\n")
    args = predict_parser().parse_args(["-c", path, "--run", "c", "--run", "d", "--no-progress", "--no-tta"])
    cfg = config_from_args(PredictConfig, args)
    assert (cfg.run, cfg.progress, cfg.tta) == (["c", "d"], False, False)
    assert config_from_args(PredictConfig, predict_parser().parse_args(["-c", path])).run == ["a", "b"]


def test_a_path_or_threshold_flag_stays_a_string():
    """Flags go through the loader as YAML: a value YAML would read as a number or a mapping stays the string."""
    cfg = config_from_args(PseudoLabelConfig, pseudo_parser().parse_args(["--threshold", "0.4", "--out", "a: b.parquet"]))
    assert (cfg.threshold, cfg.out) == ("0.4", "a: b.parquet")


@pytest.mark.parametrize("argv,match", [
    (["--threshold", "0.3,0.4"], r"threshold: one or 7 values"),
    (["--set", "batch_size=0"], r"batch_size must be >= 1"),
    (["--set", "mode=fuzzy"], r"mode: 'fuzzy' is not one of"),
    (["--set", "nonsense=1"], r"nonsense: unknown key"),
])
def test_bad_options_are_config_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        pseudo(["--run", "r", *argv])


@pytest.mark.parametrize("main,match", [(evaluate, "pass --run"), (pseudo, "pass --run"),
                                        (predict, "--run, --images, --out required")], ids=IDS)
def test_a_missing_run_is_a_config_error_not_a_traceback(main, match):
    with pytest.raises(ConfigError, match=match):
        main([])


def test_evaluate_rule_and_device_are_checked_by_the_config():
    with pytest.raises(ConfigError, match="rule: 'best' is not one of"):
        evaluate(["--run", "r", "--set", "rule=best"])
    with pytest.raises(SystemExit):  # argparse's choices: the Literal of the field
        evaluate_parser().parse_args(["--device", "tpu"])


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("cls", [EvaluateConfig, PredictConfig])
def test_the_rule_choices_are_the_metrics_rules(cls):
    """The configs spell the rules out (importing engine.metrics would import torch whenever the pipeline's config
    loads); this keeps them equal to the one definition."""
    import typing

    from spinestream.engine.metrics import RULES

    literal = next(a for a in typing.get_args(typing.get_type_hints(cls)["rule"]) if a is not type(None))
    assert typing.get_args(literal) == RULES
