"""Checkpoint folders: save/load round trip, and one clear :class:`CheckpointError` per kind of bad checkpoint.

A checkpoint is ``config.json`` + ``model.safetensors`` + ``README.md``. Loading is strict and never
unpickles anything; the pickle cases below make any unpickling attempt fail the test loudly.
"""

from __future__ import annotations

import inspect
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import learned_optim
from learned_optim import CheckpointError, LearnedOptimizer, load_rule, save_pretrained
from learned_optim.hub import CARD_NAME, CONFIG_NAME, FORMAT_VERSION, OPTIMIZER_DEFAULTS, WEIGHTS_NAME

#: A non-default configuration per family, so the round trip proves every field is saved.
CUSTOM_CONFIGS = {
    "dm_lstm": {"hidden_size": 7, "num_layers": 3, "preprocess_k": 10.0, "output_scale": 0.1},
    "rnnprop": {"hidden_size": 6, "beta1": 0.9, "beta2": 0.99, "eps": 1e-6, "output_scale": 0.05},
    "mlp": {
        "hidden_size": 9,
        "num_hidden_layers": 2,
        "decays": (0.9, 0.99),
        "time_scales": (10.0, 100.0),
        "step_scale": 0.01,
    },
    "adafac_mlp": {
        "hidden_size": 6,
        "num_hidden_layers": 3,
        "momentum_decays": (0.9, 0.95),
        "factored_decays": (0.9, 0.95),
        "time_scales": (10.0,),
        "lr_ratio_input": True,
        "magnitude_head_bound": 2.5,
        "mup": False,
        "mup_base_fan_in": 32,
        "normalize_direction": False,
        "init": "random",
    },
}


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("custom", [False, True], ids=["default", "custom"])
def test_save_and_load_round_trip(family, make_rule, tmp_path, custom):
    """Weights, the full net config, names, training summary and optimizer defaults survive; a card is written."""
    overrides = CUSTOM_CONFIGS.get(family, {}) if custom else {}
    rule = make_rule(family, seed=3, **overrides)
    training = {"tasks": ["mlp-digits"], "command": "learned-optim train ...", "results": {"loss": 0.12}}
    save_pretrained(
        rule,
        tmp_path / "ck",
        name="my-opt",
        description="a test optimizer",
        training=training,
        optimizer_defaults={"lr": 0.5},
    )
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    config = json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())
    assert config["library"] == "learned_optim" and config["format_version"] == FORMAT_VERSION
    assert config["family"] == family and config["name"] == "my-opt"
    assert config["training"] == training and config["optimizer"] == {"lr": 0.5}
    card = (tmp_path / "ck" / CARD_NAME).read_text()
    assert family in card and "from_pretrained" in card and card.startswith("---\n")

    loaded, loaded_config = load_rule(tmp_path / "ck")
    assert type(loaded) is type(rule) and loaded.config == rule.config
    assert _weights_equal(loaded, rule)
    assert loaded_config == config
    # the safetensors file holds exactly the net's tensors
    assert load_file(str(tmp_path / "ck" / WEIGHTS_NAME)).keys() == rule.state_dict().keys()


def test_optimizer_save_pretrained_and_from_pretrained(family, make_rule, tmp_path):
    """opt.save_pretrained(dir) then from_pretrained(dir, params) rebuilds the same net and defaults."""
    params = [torch.nn.Parameter(torch.randn(4))]
    opt = LearnedOptimizer(params, make_rule(family, seed=4))
    opt.save_pretrained(tmp_path / "ck", optimizer_defaults={"lr": 0.25, "weight_decay": 0.01}, card="# custom card\n")
    assert (tmp_path / "ck" / CARD_NAME).read_text() == "# custom card\n"
    restored = learned_optim.from_pretrained(str(tmp_path / "ck"), params)
    assert isinstance(restored, LearnedOptimizer) and _weights_equal(restored.rule, opt.rule)
    assert restored.param_groups[0]["lr"] == 0.25 and restored.param_groups[0]["weight_decay"] == 0.01
    assert not any(p.requires_grad for p in restored.rule.parameters())


# ------------------------------------------------------------------------------------------ bad checkpoints


def _rewrite_config(directory: Path, change: Callable[[dict], object]) -> None:
    config = json.loads((directory / CONFIG_NAME).read_text())
    result = change(config)
    (directory / CONFIG_NAME).write_text(json.dumps(config if result is None else result))


def _rewrite_weights(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    weights = load_file(str(directory / WEIGHTS_NAME))
    change(weights)
    save_file(weights, str(directory / WEIGHTS_NAME))


def _first_key(directory: Path) -> str:
    return sorted(load_file(str(directory / WEIGHTS_NAME)))[0]


def _truncate(directory: Path) -> None:
    data = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _torch_pickle(directory: Path) -> None:
    torch.save(torch.nn.Linear(2, 1).state_dict(), directory / WEIGHTS_NAME)


def _plain_pickle(directory: Path) -> None:
    (directory / WEIGHTS_NAME).write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))


def _set_first(directory: Path, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
    key = _first_key(directory)
    _rewrite_weights(directory, lambda w: w.__setitem__(key, make(w[key])))


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


#: name -> (how to break a valid checkpoint folder, regex the error message must match)
BAD_CHECKPOINTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing-config": (lambda d: (d / CONFIG_NAME).unlink(), r"config\.json does not exist"),
    "invalid-json": (lambda d: (d / CONFIG_NAME).write_text('{"family": "mlp",,}'), "not valid JSON"),
    "json-not-object": (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), "must hold a JSON object"),
    "foreign-config": (
        lambda d: (d / CONFIG_NAME).write_text(
            json.dumps(
                {
                    "architectures": ["BertModel"],
                    "model_type": "bert",
                    "hidden_size": 768,
                    "transformers_version": "4.45.0",
                }
            )
        ),
        "not a learned_optim checkpoint",
    ),
    "format-version-too-new": (
        lambda d: _rewrite_config(d, lambda c: c.update(format_version=FORMAT_VERSION + 1)),
        "format version 2 is not supported",
    ),
    "format-version-not-int": (
        lambda d: _rewrite_config(d, lambda c: c.update(format_version="1")),
        "format_version must be an integer",
    ),
    "unknown-family": (lambda d: _rewrite_config(d, lambda c: c.update(family="velo")), "unknown net family 'velo'"),
    "family-not-a-string": (lambda d: _rewrite_config(d, lambda c: c.update(family=["mlp"])), "unknown net family"),
    "negative-size": (
        lambda d: _rewrite_config(d, lambda c: c["net"].update(hidden_size=-3)),
        "invalid net configuration",
    ),
    "optimizer-defaults-null": (
        lambda d: _rewrite_config(d, lambda c: c.update(optimizer=None)),
        "'optimizer' must be a JSON object",
    ),
    "optimizer-default-unknown": (
        lambda d: _rewrite_config(d, lambda c: c.update(optimizer={"lr": 0.1, "betas": [0.9, 0.99]})),
        r"unknown optimizer defaults \['betas'\]",
    ),
    "optimizer-default-mistyped": (
        lambda d: _rewrite_config(d, lambda c: c.update(optimizer={"lr": "1e-3"})),
        "optimizer default 'lr' has the wrong type",
    ),
    "unknown-net-field": (
        lambda d: _rewrite_config(d, lambda c: c["net"].update(dropout=0.1)),
        r"invalid net configuration.*dropout",
    ),
    "wrongly-typed-net-field": (
        lambda d: _rewrite_config(d, lambda c: c["net"].update(hidden_size="20")),
        r"invalid net configuration.*Config.hidden_size must be int, got .20.",
    ),
    "missing-weights": (lambda d: (d / WEIGHTS_NAME).unlink(), r"model\.safetensors does not exist"),
    "truncated-weights": (_truncate, "not a readable safetensors file"),
    "torch-pickle-as-safetensors": (_torch_pickle, "not a readable safetensors file"),
    "plain-pickle-as-safetensors": (_plain_pickle, "not a readable safetensors file"),
    "missing-tensor": (lambda d: _rewrite_weights(d, lambda w: w.pop(sorted(w)[0])), r"missing tensors \['"),
    "unexpected-tensor": (
        lambda d: _rewrite_weights(d, lambda w: w.__setitem__("extra.weight", torch.ones(2))),
        r"unexpected tensors \['extra\.weight'\]",
    ),
    "wrong-shape": (lambda d: _set_first(d, lambda t: torch.zeros(t.numel() + 1)), "has shape"),
    "non-floating-tensor": (
        lambda d: _set_first(d, lambda t: torch.zeros(t.shape, dtype=torch.int64)),
        "non-floating dtype",
    ),
    "non-finite-weights": (lambda d: _set_first(d, _nan), "holds NaN or inf"),
}


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Python-level unpickling entry point fail the test if it is called."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint loader tried to unpickle data")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_raises_clear_error(family, make_rule, tmp_path, kind, no_unpickling):
    """Each kind of broken checkpoint raises CheckpointError naming the problem, via load_rule and from_pretrained."""
    directory = tmp_path / "ck"
    save_pretrained(make_rule(family), directory)
    load_rule(directory)  # valid before it is broken
    breaker, message = BAD_CHECKPOINTS[kind]
    breaker(directory)
    with pytest.raises(CheckpointError, match=message):
        load_rule(directory)
    with pytest.raises(CheckpointError, match=message):
        learned_optim.from_pretrained(directory, [torch.nn.Parameter(torch.zeros(2))])


def test_the_same_weights_save_to_the_same_bytes(tmp_path):
    """The weights file is identified by its bytes (the benchmark store's run keys): saving the same net again
    writes the same bytes, whatever order safetensors' hash map of metadata takes this time."""
    rule = learned_optim.build_rule("adafac_mlp", {"hidden_size": 4})
    saved = {(save_pretrained(rule, tmp_path / str(i)) / WEIGHTS_NAME).read_bytes() for i in range(16)}
    assert len(saved) == 1


def test_the_optimizer_defaults_a_checkpoint_may_set_are_the_optimizers_keywords_with_json_defaults():
    """``OPTIMIZER_DEFAULTS`` lists keywords of :class:`LearnedOptimizer` whose own defaults are of the listed
    JSON types, so the two cannot drift apart."""
    keywords = inspect.signature(LearnedOptimizer).parameters
    for key, kinds in OPTIMIZER_DEFAULTS.items():
        assert key in keywords, key
        default = keywords[key].default
        assert default is None or isinstance(default, kinds), (key, default)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_reconfigure_checkpoint_changes_an_optimizer_default(tmp_path, capsys):
    """``meta reconfigure FOLDER --optimizer lr=0.01``: config.json's optimizer default changes (``from_pretrained``
    without an lr takes it; an lr passed still wins), recorded as ``optimizer.lr`` with the value before; the weights
    are untouched. An unknown default, a wrong type, an invalid value (the optimizer's own check) or the value already
    set is refused in one line with nothing written."""
    from learned_optim.meta.cli import main as meta_main

    folder = save_pretrained(learned_optim.AdafacMLP(), tmp_path / "lr", name="lr")
    weights = (folder / WEIGHTS_NAME).read_bytes()
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["net"]["direction_clip"]  # as in a checkpoint written before the field existed: it stays absent
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    default, net = config.get("optimizer", {}).get("lr"), config["net"]
    assert meta_main(["reconfigure", str(folder), "--optimizer", "lr=0.01"]) == 0
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["optimizer"]["lr"] == 0.01 and config["net"] == net
    (record,) = config["training"]["reconfigured"]
    assert record["settings"] == {"optimizer.lr": 0.01} and record["before"] == {"optimizer.lr": default}
    assert "`optimizer.lr`" in (folder / CARD_NAME).read_text()
    assert (folder / WEIGHTS_NAME).read_bytes() == weights
    param = torch.nn.Parameter(torch.zeros(3))
    assert learned_optim.from_pretrained(str(folder), [param]).param_groups[0]["lr"] == 0.01
    assert learned_optim.from_pretrained(str(folder), [param], lr=0.2).param_groups[0]["lr"] == 0.2
    before = {name: (folder / name).read_bytes() for name in (CONFIG_NAME, CARD_NAME, WEIGHTS_NAME)}
    capsys.readouterr()
    for bad in ("betas=0.9", "lr=fast", "lr=-1.0", "lr=0.01"):
        assert meta_main(["reconfigure", str(folder), "--optimizer", bad]) == 2
    assert meta_main(["reconfigure", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err), err
    assert "unknown optimizer defaults" in err[0] and "wrong type" in err[1] and "already set" in err[3]
    assert {name: (folder / name).read_bytes() for name in before} == before


def test_unknown_name_is_a_clear_error(tmp_path, monkeypatch):
    """A name that is no folder, no zoo entry and no 'owner/name' id fails before touching the Hub."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="neither a local checkpoint folder, nor a zoo name"):
        load_rule("no-such-optimizer")
    with pytest.raises(CheckpointError, match="neither a local checkpoint folder"):
        load_rule("a/b/c")


def test_reconfigure_checkpoint_changes_a_setting_in_place_and_records_it(tmp_path, capsys):
    """``meta reconfigure FOLDER --net FIELD=VALUE``: config.json's net gets the value (the loaded net runs with it),
    ``training.reconfigured`` and the card record the change and the command, the weights file is byte for byte the
    same and the card's other sections stay; a second change adds a record. A setting that would change the weights,
    an unknown or invalid one, or one already set is refused in one line with nothing written."""
    from learned_optim.hub import RECONFIGURED_HEADING, reconfigure_checkpoint
    from learned_optim.meta.cli import main as meta_main

    folder = save_pretrained(learned_optim.AdafacMLP(newton_schulz_steps=5), tmp_path / "ns", name="ns")
    weights = (folder / WEIGHTS_NAME).read_bytes()
    card = (folder / CARD_NAME).read_text()
    assert meta_main(["reconfigure", str(folder), "--net", "newton_schulz_dtype=auto"]) == 0
    rule, config = load_rule(folder)
    assert rule.config.newton_schulz_dtype == "auto" and config["net"]["newton_schulz_dtype"] == "auto"
    (record,) = config["training"]["reconfigured"]
    assert record["settings"] == {"newton_schulz_dtype": "auto"}
    assert record["before"] == {"newton_schulz_dtype": "float32"}
    assert "learned_optim.meta reconfigure" in record["command"]
    assert (folder / WEIGHTS_NAME).read_bytes() == weights
    new_card = (folder / CARD_NAME).read_text()
    assert new_card.split("## Net configuration")[0] == card.split("## Net configuration")[0]
    assert RECONFIGURED_HEADING in new_card and '"newton_schulz_dtype": "auto"' in new_card
    assert '"newton_schulz_dtype": "float32"' in card and '"newton_schulz_dtype": "float32"' not in new_card
    assert "`newton_schulz_dtype` 'float32' -> 'auto'" in new_card
    reconfigure_checkpoint(folder, {"second_moment_decay": 0.95})
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert [r["settings"] for r in config["training"]["reconfigured"]] == [
        {"newton_schulz_dtype": "auto"},
        {"second_moment_decay": 0.95},
    ]
    assert (folder / CARD_NAME).read_text().count(RECONFIGURED_HEADING) == 1
    before = {name: (folder / name).read_bytes() for name in (CONFIG_NAME, CARD_NAME, WEIGHTS_NAME)}
    capsys.readouterr()
    for bad in ("hidden_size=16", "no_such_field=1", "newton_schulz_dtype=float16", "second_moment_decay=0.95"):
        assert meta_main(["reconfigure", str(folder), "--net", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
    assert "already set" in err[3]
    assert {name: (folder / name).read_bytes() for name in before} == before
