import pytest

from digitkit import config
from digitkit.errors import ConfigError

from .conftest import ROOT


def test_shipped_configs_load_and_resolve_round_trip(tmp_path):
    import yaml

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        if "entries" in raw:
            continue  # a comparison file (digitkit compare), checked in test_compare.py
        if "params" in raw:  # a search space (digitkit tune): it must fit the default recipe
            from digitkit import tune

            assert tune.load_space(path, config.load(ROOT / "configs" / "default.yaml")).params, path.name
            continue
        cfg = config.load(path)
        config.save(cfg, tmp_path / "c.yaml")
        assert config.load(tmp_path / "c.yaml") == cfg, path.name


def test_defaults_and_overrides_parse_types():
    cfg = config.load(None, ["train.lr=3e-3", "train.epochs=4", "model.name=cnn1", "augment.recipe=mild",
                             "model.args={dropout: 0.1}", "train.amp=false"])  # fmt: skip
    assert cfg.train.lr == 0.003 and cfg.train.epochs == 4 and cfg.train.amp is False
    assert cfg.model.name == "cnn1" and cfg.model.args == {"dropout": 0.1}
    assert cfg.augment.rotation.p > 0 and cfg.augment.elastic.p == 0


def test_int_accepted_for_float_but_not_bool_for_int():
    assert config.load(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs.*expected int"):
        config.load(None, ["train.epochs=true"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1e-3", "unknown config key 'train.lrr'; valid keys here: epochs, batch_size"),
        ("trian.lr=1e-3", "unknown config key 'trian'"),
        ("train.optimizer=rmsprop", "train.optimizer = 'rmsprop': expected one of adam, adamw, sgd"),
        ("train.schedule=linear", "expected one of none, plateau, onecycle, cosine"),
        ("train.epochs=0", "train.epochs = 0: expected a positive integer"),
        ("train.lr=-1", "positive learning rate"),
        ("train.lr=fast", "expected float"),
        ("data.val_fraction=1", "expected a fraction in [0, 1) such as 0.1"),
        ("data.val_fraction=0", "it needs train.checkpoint_metric=last, train.early_stopping_patience_epochs=0 (set"),
        ("augment.recipe=nosuch", "nosuch"),
        ("train.lr", "expected KEY=VALUE"),
        ("train=3", "expected a mapping"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        config.load(listy)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'train.epoch'"):
        config.load(typo)
