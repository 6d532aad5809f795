"""align.config: command line and YAML presets generated from a frozen dataclass config."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from align.config import (
    ConfigError,
    build_parser,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_config,
    save_config,
)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings."""

    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, ...] = (0.9, 0.95)
    """Adam betas."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters."""

    r: int = 8
    """Adapter rank."""
    enabled: bool = False
    """Train adapters instead of the full weights."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Modules that get adapters."""


@dataclass(frozen=True)
class ExampleConfig:
    """A small recipe config."""

    output_dir: Path = Path("runs/example")
    """Where checkpoints go."""
    seed: int = 0
    """Random seed."""
    max_steps: int | None = None
    """Stop after this many steps; None runs the whole dataset."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO loss variant."""
    packing: bool = True
    """Pack sequences into rows."""
    layers: tuple[int, ...] = (0, 1)
    """Layers to train."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form options."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16))
    """Adapter settings."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def cli_error(capsys, argv: list[str], cls: type = ExampleConfig) -> str:
    """Runs the parser expecting an argparse-style failure; returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_defaults():
    cfg = parse_config(ExampleConfig, [])
    assert cfg == ExampleConfig()
    assert cfg.lora.r == 16  # the nested default comes from the field's default_factory


def test_yaml_preset(tmp_path):
    path = write(tmp_path, "seed: 3\nlayers: [2, 3]\noptim: {lr: 7e-6}\nlora:\n  enabled: true\n")
    cfg = parse_config(ExampleConfig, ["--config", str(path)])
    assert cfg.seed == 3 and cfg.layers == (2, 3)
    assert cfg.optim.lr == 7e-6 and isinstance(cfg.optim.lr, float)  # YAML 1.1 alone would read "7e-6" as a str
    assert cfg.lora == LoraConfig(r=16, enabled=True)  # untouched nested fields keep their defaults
    assert load_config(ExampleConfig, path) == cfg


def test_cli_overrides_yaml(tmp_path):
    path = write(tmp_path, "seed: 3\noptim: {lr: 7e-6, weight_decay: 0.1}\n")
    cfg = parse_config(ExampleConfig, ["--optim-lr", "1e-4", "--config", str(path), "--seed", "5"])
    assert (cfg.seed, cfg.optim.lr, cfg.optim.weight_decay) == (5, 1e-4, 0.1)


@pytest.mark.parametrize("argv, get, expected", [
    (["--output-dir", "x"], lambda c: c.output_dir, Path("x")),
    (["--output_dir", "x"], lambda c: c.output_dir, Path("x")),
    (["--lora-r", "4"], lambda c: c.lora.r, 4),
    (["--lora.r", "4"], lambda c: c.lora.r, 4),
    (["--optim-weight-decay", "0.1"], lambda c: c.optim.weight_decay, 0.1),
    (["--optim.weight_decay=0.1"], lambda c: c.optim.weight_decay, 0.1),
])
def test_flag_spellings(argv, get, expected):
    assert get(parse_config(ExampleConfig, argv)) == expected


@pytest.mark.parametrize("argv, packing, lora", [
    ([], True, False),
    (["--no-packing"], False, False),
    (["--packing", "false", "--lora-enabled"], False, True),
    (["--packing=yes", "--lora-enabled", "true"], True, True),
    (["--no-packing", "--packing", "--no-lora.enabled"], True, False),  # the last flag wins
])
def test_bool_forms(argv, packing, lora):
    cfg = parse_config(ExampleConfig, argv)
    assert (cfg.packing, cfg.lora.enabled) == (packing, lora)


def test_none_for_optionals(tmp_path, capsys):
    assert parse_config(ExampleConfig, ["--max-steps", "10"]).max_steps == 10
    path = write(tmp_path, "max_steps: 10\n")
    assert parse_config(ExampleConfig, ["--config", str(path), "--max-steps", "none"]).max_steps is None
    assert parse_config(ExampleConfig, ["--max-steps", "NULL"]).max_steps is None
    assert "--seed: expected int, got 'none'" in cli_error(capsys, ["--seed", "none"])  # seed is not optional


def test_tuples():
    cfg = parse_config(ExampleConfig, ["--layers", "3, 4,5", "--optim-betas", "0.8,0.99", "--lora-targets", "o_proj"])
    assert (cfg.layers, cfg.optim.betas, cfg.lora.targets) == ((3, 4, 5), (0.8, 0.99), ("o_proj",))
    assert parse_config(ExampleConfig, ["--layers", ""]).layers == ()


def test_dict_field_takes_json(tmp_path):
    assert parse_config(ExampleConfig, ["--extra", '{"a": [1, 2]}']).extra == {"a": [1, 2]}
    path = write(tmp_path, "extra:\n  temperature: 0.7\n")
    assert parse_config(ExampleConfig, ["--config", str(path)]).extra == {"temperature": 0.7}


def test_literal_choices(capsys):
    assert parse_config(ExampleConfig, ["--loss", "ipo"]).loss == "ipo"
    err = cli_error(capsys, ["--loss", "hinge"])
    assert "argument --loss: invalid choice 'hinge' (choose from sigmoid, ipo)" in err


def test_unknown_yaml_key_names_file_key_and_suggestion(tmp_path, capsys):
    path = write(tmp_path, "optim:\n  lrr: 1e-5\n")
    err = cli_error(capsys, ["--config", str(path)])
    assert f"{path}: optim.lrr: unknown field; did you mean optim.lr?" in err


def test_wrong_yaml_type(tmp_path, capsys):
    path = write(tmp_path, "seed: abc\n")
    assert f"{path}: seed: expected int, got str 'abc'" in cli_error(capsys, ["--config", str(path)])
    path = write(tmp_path, "layers: [1, x]\n")
    assert f"{path}: layers[1]: expected int, got str 'x'" in cli_error(capsys, ["--config", str(path)])
    path = write(tmp_path, "optim: 3\n")
    assert f"{path}: optim: expected a mapping of OptimConfig fields" in cli_error(capsys, ["--config", str(path)])
    path = write(tmp_path, "loss: hinge\n")
    assert f"{path}: loss: 'hinge' is not one of 'sigmoid', 'ipo'" in cli_error(capsys, ["--config", str(path)])


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    assert f"{path}: no such file" in cli_error(capsys, ["--config", str(path)])


def test_post_init_error_names_the_field(capsys):
    err = cli_error(capsys, ["--optim-lr=-1"])
    assert "optim.lr: lr must be > 0, got -1.0" in err
    with pytest.raises(ConfigError, match=r"^<dict>: optim.lr: lr must be > 0"):
        config_from_dict(ExampleConfig, {"optim": {"lr": 0.0}})


def test_unknown_flag_suggests(capsys):
    assert "unrecognized arguments: --optim-learning-rate 1; did you mean --optim-lr" in cli_error(
        capsys, ["--optim-learning-rate", "1"]
    )


def test_help_lists_nested_fields_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ExampleConfig, ["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "A small recipe config." in out
    assert "--optim-weight-decay FLOAT Decoupled weight decay. (float; default: 0.0)" in out
    assert "--lora-r INT Adapter rank. (int; default: 16)" in out
    assert "--max-steps INT Stop after this many steps; None runs the whole dataset. (int | None; default: none)" in out
    assert "--loss {sigmoid,ipo}" in out and "--layers INT,..." in out
    assert "lora: Adapter settings." in out
    assert "--lora.r" not in out  # aliases are accepted but not listed


def test_save_load_round_trip(tmp_path):
    cfg = ExampleConfig(
        output_dir=Path("/tmp/run 1"), max_steps=None, loss="ipo", layers=(), extra={"s": "1e-5", "n": None, "x": 1.5},
        optim=OptimConfig(lr=7e-7, betas=(0.9, 0.999)), lora=LoraConfig(r=2, enabled=True, targets=("null", "yes")),
    )
    path = tmp_path / "ckpt" / "config.yaml"
    save_config(cfg, path)
    assert load_config(ExampleConfig, path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert config_to_dict(cfg)["output_dir"] == "/tmp/run 1" and config_to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]
    assert parse_config(ExampleConfig, ["--config", str(path)]) == cfg


def test_config_from_dict_reports_source():
    with pytest.raises(ConfigError, match=r"^run.yaml: lora.rank: unknown field"):
        config_from_dict(ExampleConfig, {"lora": {"rank": 4}}, source="run.yaml")
    assert config_from_dict(ExampleConfig, {"seed": 1, "optim": {"lr": 1}}).optim.lr == 1.0


@dataclass(frozen=True)
class Collides:
    lora_r: int = 1
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class ShadowsConfigFlag:
    config: str = "x"


@dataclass(frozen=True)
class Required:
    name: str
    """Run name."""
    seed: int = 0


def test_flag_collisions_raise_when_building():
    with pytest.raises(ValueError, match="lora_r and lora.r both map to the flag --lora-r"):
        build_parser(Collides)
    with pytest.raises(ValueError, match="--config"):
        build_parser(ShadowsConfigFlag)


def test_required_field(capsys):
    assert parse_config(Required, ["--name", "a"]) == Required(name="a")
    assert "name: required field is missing" in cli_error(capsys, [], Required)


def test_docstrings_are_optional():
    made = dataclasses.make_dataclass("Made", [("k", int, 3)], frozen=True)  # no source to read
    assert parse_config(made, ["--k", "4"]).k == 4
    assert "(int; default: 3)" in build_parser(made).format_help()
