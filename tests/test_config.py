"""One configuration schema: the flags, the TOML file, fit's keyword arguments, TrainConfig and
config.json are all derived from pyro_vae.config.OPTIONS, and cannot disagree."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from pyro_vae import VAE, config, fit
from pyro_vae.cli import _train_options, build_parser, main
from pyro_vae.errors import ConfigError

#: one valid value per option, different from its default, as TOML text
NON_DEFAULT_TOML = {
    "data": '"data.npy"', "data_dir": '"/tmp/somewhere"', "download": "true",
    "binarize": '"dynamic"', "prior": '"mog"', "likelihood": '"normal"',
    "likelihood_scale": "0.25", "guide": '"full-rank"', "encoder": '"linear"',
    "decoder": '"conv"', "hidden": "[32, 16]", "activation": '"tanh"', "latent_dim": "3", "conditional": "true",
    "levels": "9", "objective": '"iwae"', "particles": "7", "beta": "0.5", "alpha": "0.25",
    "groups": "3", "elbo_weight": "0.75",
    "anneal_steps": "11", "free_bits": "0.125", "epochs": "13", "batch_size": "17",
    "lr": "0.0025", "lr_schedule": '"burda"', "seed": "19", "device": '"cpu"', "log_every": "23", "val_particles": "2",
    "checkpoint_every": "7.5", "labelled_batch": "3",
    "out": '"runs/x"', "eval_particles": "29", "tensorboard": '"tb"',
    "model": '"mixture"', "labels_per_class": "10", "conditional_prior": "true",
    "semi_supervised": "true",
}
#: the same values as flag text
FLAG_TEXT = {name: text.strip('"').strip("[]").replace(" ", "")
             for name, text in NON_DEFAULT_TOML.items()}
#: wrongly typed TOML values for each kind of option (each must be refused)
WRONG_TYPES = {
    config.POSITIVE_INT: ["1.9", "true", '"3"', "0"], config.NON_NEGATIVE_INT: ["2.5", "false", "-1"],
    config.SEED: ["-1", "4294967296", "1.0"], config.POSITIVE: ['"0.1"', "true", "0", "-1.0"],
    config.NON_NEGATIVE: ['"1"', "false", "-0.5"], config.FINITE: ['"0.5"', "true", "inf"],
    config.UNIT_INTERVAL: ['"0.5"', "true", "1.5", "-0.1", "nan"],
    config.BOOLEAN: ['"false"', "1", "0"], config.STRING: ["3", "true", "[1]"],
    config.HIDDEN: ["[1.9]", "[true]", "16", "[]", "[0]", '"a,b"'],
    config.SCALE: ["true", '"wide"', "0", "-1"],
    config.LATENT_DIMS: ["1.9", "[true]", "0", "[]", "[0, 2]", '"a,b"', "true"],
}


def test_every_option_has_a_non_default_example():
    assert set(NON_DEFAULT_TOML) == set(config.BY_NAME)


def test_the_train_flags_are_the_schema():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {action.dest for action in train._actions}
    assert {option.name for option in config.OPTIONS} <= flags
    own = {"help", "config", "resume", "quiet", "threads", "dry_run",
           "prior_option", "likelihood_option", "guide_option", "model_option", "imports"}
    assert flags - {option.name for option in config.OPTIONS} == own


def test_fit_keyword_arguments_are_the_training_section():
    parameters = inspect.signature(fit).parameters
    training = {option.name: option.default for option in config.TRAINING}
    derived = {name: p.default for name, p in parameters.items() if name in training}
    assert derived == training
    others = set(parameters) - set(training)
    assert others == {"vae", "data", "out", "progress", "callbacks", "extra_config"}


def test_train_config_fields_are_the_training_section():
    fields = {f.name: f.default for f in dataclasses.fields(config.TrainConfig)}
    assert fields == {option.name: option.default for option in config.TRAINING}


def test_defaults_agree_between_the_command_line_and_fit():
    args = build_parser().parse_args(["train"])
    options = _train_options(args)
    fit_defaults = {name: p.default for name, p in inspect.signature(fit).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    for option in config.TRAINING:
        if option.name == "particles":  # None in both: the objective's own default
            assert fit_defaults["particles"] is None and options["particles"] == 1
            continue
        assert options[option.name] == fit_defaults[option.name] == option.default


def test_a_toml_file_sets_every_option_and_component_options(tmp_path):
    text = "\n".join(f"{name} = {value}" for name, value in NON_DEFAULT_TOML.items()
                     if name not in ("prior", "likelihood", "guide"))
    text += ('\n[prior]\nname = "mog"\ncomponents = 3\n[likelihood]\nname = "normal"\n'
             '[guide]\nname = "full-rank"\n')
    path = tmp_path / "run.toml"
    path.write_text(text)
    options = _train_options(build_parser().parse_args(["train", "--config", str(path)]))
    for name, value in NON_DEFAULT_TOML.items():
        expected = config.BY_NAME[name].check(__import__("tomllib").loads(f"v = {value}")["v"])
        assert options[name] == expected, name
        assert options[name] != config.DEFAULTS[name], name
    assert options["prior_options"] == {"components": 3}


def test_flags_give_the_same_values_as_the_toml_file_and_win(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("\n".join(f"{name} = {value}" for name, value in NON_DEFAULT_TOML.items()))
    from_file = _train_options(build_parser().parse_args(["train", "--config", str(path)]))
    argv = ["train"]
    for name, text in FLAG_TEXT.items():
        option = config.BY_NAME[name]
        argv += [option.flag] if option.kind is config.BOOLEAN else [option.flag, text]
    from_flags = _train_options(build_parser().parse_args(argv))
    assert from_flags == from_file
    # a flag wins over the file, a --no-flag too
    winner = _train_options(build_parser().parse_args(
        ["train", "--config", str(path), "--epochs", "3", "--no-conditional"]))
    assert winner["epochs"] == 3 and winner["conditional"] is False


@pytest.mark.parametrize("option", config.OPTIONS, ids=lambda o: o.name)
def test_wrongly_typed_toml_values_are_one_line_errors_naming_file_option_value(option, tmp_path):
    path = tmp_path / "bad.toml"
    for text in WRONG_TYPES[option.kind]:
        path.write_text(f"{option.name} = {text}\n")
        with pytest.raises(ConfigError) as error:
            config.read_toml(path)
        message = str(error.value)
        assert "\n" not in message
        assert str(path) in message and repr(option.name) in message, message
        value = __import__("tomllib").loads(f"v = {text}")["v"]
        assert repr(value) in message, message


def test_choices_are_checked_in_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('objective = "elbow"\n')
    with pytest.raises(ConfigError, match=r"option 'objective' expects one of elbo, .*got 'elbow'"):
        config.read_toml(path)
    path.write_text('[prior]\nname = "nope"\n')
    with pytest.raises(ConfigError, match=r"'\[prior\] name' expects one of .*got 'nope'"):
        config.read_toml(path)


@pytest.mark.parametrize("bad, message", [
    ({"epochs": 2.5}, "option 'epochs' expects a positive integer, got 2.5"),
    ({"epochs": True}, "option 'epochs' expects a positive integer, got True"),
    ({"lr": "0.1"}, "option 'lr' expects a positive number, got '0.1'"),
    ({"seed": -1}, "option 'seed' expects an integer from 0 to 2**32 - 1, got -1"),
    ({"objective": "elbow"}, "option 'objective' expects one of"),
    ({"learning_rate": 0.1}, "unknown training option 'learning_rate'"),
])
def test_fit_refuses_what_the_schema_refuses(bad, message, digits):
    vae = VAE(digits.data_shape, 2, hidden=(8,))
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        fit(vae, digits, progress=False, **{"epochs": 1, **bad})


def test_config_json_training_is_the_train_config(tmp_path, digits):
    vae = VAE(digits.data_shape, 2, hidden=(8,))
    result = fit(vae, digits, "iwae", epochs=1, batch_size=500, lr=2e-3, seed=3, log_every=2,
                 device="cpu", out=tmp_path / "run", progress=False)
    written = json.loads((tmp_path / "run" / "config.json").read_text())["training"]
    assert sorted(written) == sorted(option.name for option in config.TRAINING)
    assert written == {**config.DEFAULTS_TRAINING, "objective": "iwae", "particles": 5,
                       "epochs": 1, "batch_size": 500, "lr": 2e-3, "seed": 3, "log_every": 2,
                       "device": "cpu"}
    assert result.config["training"] == written


def test_the_command_line_writes_what_the_toml_file_says(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('epochs = 1\nhidden = [8]\nlatent_dim = 2\neval_particles = 0\n'
                    'batch_size = 600\nlog_every = 3\nval_particles = 2\ndevice = "cpu"\n'
                    '[prior]\nname = "mog"\ncomponents = 3\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out), "--quiet"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["training"]["log_every"] == 3 and written["training"]["val_particles"] == 2
    assert written["model"]["prior"] == "mog"
    assert written["model"]["prior_options"] == {"components": 3}
