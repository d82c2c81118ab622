"""Weight soups: the average of fine-tunes of one parent, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import learned_optim
from learned_optim import build_rule, save_pretrained
from learned_optim.hub import (
    CheckpointError,
    load_rule_from_dir,
    parent_record,
    read_config,
    records_meta_training,
    weights_sha256,
)
from learned_optim.meta.cli import main as meta_main
from learned_optim.meta.soup import weight_soup

NET = {"hidden_size": 4}


def fine_tune(
    folder, seed, parent="parent-net", family="adafac_mlp", net=NET, lr=1e-3, schedule="cosine", meta_trained=True
):
    """A checkpoint as the meta-trainer writes a fine-tune of ``parent``: random weights of ``seed``."""
    torch.manual_seed(seed)
    rule = build_rule(family, net)
    training = {
        "parent": parent_record({"name": parent, "family": family, "net": net}, init_from=parent),
        **({"meta_training": {"command": f"train fixture {seed}", "wall_time_seconds": 60.0}} if meta_trained else {}),
    }
    save_pretrained(
        rule, folder, name=f"ft-{seed}", training=training, optimizer_defaults={"lr": lr}, schedule=schedule
    )
    return rule


def test_a_soup_is_the_mean_of_its_ingredients_and_loads(tmp_path):
    rules = [fine_tune(tmp_path / f"ft{i}", seed=i) for i in range(3)]
    out = weight_soup([tmp_path / f"ft{i}" for i in range(3)], tmp_path / "soup", command="python -m x")
    soup, config = load_rule_from_dir(out)
    for key, value in soup.state_dict().items():
        expected = torch.stack([r.state_dict()[key] for r in rules]).mean(0)
        torch.testing.assert_close(value, expected)
    assert config["name"] == "ft-0-soup" and config["schedule"] == "cosine" and config["optimizer"] == {"lr": 1e-3}
    assert config["training"]["parent"]["name"] == "parent-net"
    ingredients = config["training"]["soup"]["ingredients"]
    assert [i["name"] for i in ingredients] == ["ft-0", "ft-1", "ft-2"] and len(ingredients[0]["weights_sha256"]) == 16
    card = (out / "README.md").read_text()
    assert "## Weight soup" in card and "python -m x" in card and "ft-2" in card and "`train fixture 2`" in card
    assert "3.0 min in all" in card and ingredients[1]["wall_time_seconds"] == 60.0
    model = torch.nn.Linear(3, 2)
    opt = learned_optim.from_pretrained(str(out), model.parameters())
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()


def test_a_soup_records_meta_training_only_when_every_ingredient_does(tmp_path):
    fine_tune(tmp_path / "a", seed=0)
    fine_tune(tmp_path / "b", seed=1)
    fine_tune(tmp_path / "untrained", seed=2, meta_trained=False)
    trained = weight_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "s1")
    mixed = weight_soup([tmp_path / "a", tmp_path / "untrained"], tmp_path / "s2")
    assert records_meta_training(read_config(trained)) and not records_meta_training(read_config(mixed))
    assert records_meta_training(read_config(weight_soup([trained, tmp_path / "b"], tmp_path / "s3")))  # soup of a soup
    assert not records_meta_training({"training": {}}) and records_meta_training({"training": {"meta_training": 1}})


@pytest.mark.parametrize(
    "other, message",
    [
        ({"parent": "another-parent"}, "disagree on the parent checkpoint"),
        ({"net": {"hidden_size": 8}}, "disagree on the net configuration"),
        ({"family": "mlp", "net": {}}, "disagree on the family"),
        ({"lr": 3e-3}, "disagree on the optimizer defaults"),
        ({"schedule": "constant"}, "disagree on the lr schedule"),
    ],
)
def test_a_soup_of_unrelated_checkpoints_is_refused(tmp_path, other, message):
    fine_tune(tmp_path / "a", seed=0)
    fine_tune(tmp_path / "b", seed=1, **other)
    with pytest.raises(CheckpointError, match=message):
        weight_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_the_soup_command_writes_a_folder_and_fails_in_one_line(tmp_path, capsys):
    fine_tune(tmp_path / "a", seed=0)
    fine_tune(tmp_path / "b", seed=1)
    assert (
        meta_main(["soup", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "s"), "--name", "s"]) == 0
    )
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["name"] == "s" and "learned_optim.meta soup" in config["training"]["soup"]["command"]
    capsys.readouterr()
    assert meta_main(["soup", str(tmp_path / "a"), "--out", str(tmp_path / "t")]) == 2
    assert meta_main(["soup", str(tmp_path / "a"), str(tmp_path / "nope"), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: a soup needs two or more") and "Traceback" not in "".join(err)


def test_a_soup_over_one_of_its_ingredients_or_of_one_folder_twice_is_refused(tmp_path):
    """Writing the soup into one of its ingredients would overwrite it, and a folder given twice would weigh double:
    both are refused before anything is written."""
    fine_tune(tmp_path / "a", seed=0)
    fine_tune(tmp_path / "b", seed=1)
    weights = (tmp_path / "a" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is one of its ingredients"):
        weight_soup([tmp_path / "a", tmp_path / "b"], tmp_path / "b" / ".." / "a")
    with pytest.raises(ValueError, match="given more than once"):
        weight_soup([tmp_path / "a", tmp_path / "b", tmp_path / "a"], tmp_path / "soup")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == weights and not (tmp_path / "soup").exists()


def test_a_scaled_soup_moves_from_the_parent_along_the_mean_displacement(tmp_path):
    parent_rule = build_rule("adafac_mlp", NET)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in parent_rule.parameters():
            p.normal_()
    save_pretrained(parent_rule, tmp_path / "parent", name="parent-net", optimizer_defaults={"lr": 1e-3})
    rules = [fine_tune(tmp_path / f"ft{i}", seed=i) for i in range(2)]
    sources = [tmp_path / "ft0", tmp_path / "ft1"]
    for scale in (0.5, 1.0, 2.0):
        out = weight_soup(sources, tmp_path / f"soup{scale}", parent=tmp_path / "parent", scale=scale)
        soup, config = load_rule_from_dir(out)
        for key, value in soup.state_dict().items():
            start = parent_rule.state_dict()[key]
            mean = (rules[0].state_dict()[key] + rules[1].state_dict()[key]) / 2
            torch.testing.assert_close(value, start + scale * (mean - start))
        recipe = config["training"]["soup"]
        assert recipe["scale"] == scale and recipe["parent_folder"] == str(tmp_path / "parent")
        assert len(recipe["parent_weights_sha256"]) == 16 and config["training"]["parent"]["name"] == "parent-net"
        assert f"plus {scale:g} times the mean displacement" in (out / "README.md").read_text()
    plain = load_rule_from_dir(weight_soup(sources, tmp_path / "plain"))[0].state_dict()
    for key, value in load_rule_from_dir(tmp_path / "soup1.0")[0].state_dict().items():
        torch.testing.assert_close(value, plain[key])


def test_a_scaled_soup_needs_the_ingredients_own_parent(tmp_path):
    fine_tune(tmp_path / "a", seed=0)
    fine_tune(tmp_path / "b", seed=1)
    sources = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ValueError, match="give the parent's folder"):
        weight_soup(sources, tmp_path / "s", scale=2.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="finite number above 0"):
            weight_soup(sources, tmp_path / "s", parent=tmp_path / "a", scale=bad)
    with pytest.raises(ValueError, match="also one of the soup's ingredients"):
        weight_soup(sources, tmp_path / "s", parent=tmp_path / "a", scale=2.0)
    save_pretrained(build_rule("adafac_mlp", NET), tmp_path / "stranger", name="another-net")
    save_pretrained(build_rule("adafac_mlp", {"hidden_size": 6}), tmp_path / "wider", name="parent-net")
    for folder in ("stranger", "wider"):
        with pytest.raises(CheckpointError, match="is not the ingredients' parent"):
            weight_soup(sources, tmp_path / "s", parent=tmp_path / folder, scale=2.0)
    assert not (tmp_path / "s").exists()


def test_the_soup_command_takes_a_parent_and_a_scale(tmp_path, capsys):
    save_pretrained(build_rule("adafac_mlp", NET), tmp_path / "parent", name="parent-net")
    fine_tune(tmp_path / "a", seed=0)
    fine_tune(tmp_path / "b", seed=1)
    args = ["soup", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "s")]
    assert meta_main([*args, "--scale", "1.5"]) == 2
    assert "give the parent's folder" in capsys.readouterr().err
    assert meta_main([*args, "--scale", "1.5", "--parent", str(tmp_path / "parent")]) == 0
    config = read_config(tmp_path / "s")
    assert config["training"]["soup"]["scale"] == 1.5 and "--scale 1.5" in config["training"]["soup"]["command"]


def test_a_soup_can_change_net_settings_its_weights_do_not_depend_on(tmp_path, capsys):
    """``net_overrides`` / ``--net``: the soup's weights are the plain average bit for bit, its net configuration has
    the new values, and the change is recorded in its config and card; a field that is unknown, invalid or changes
    the weights' shapes is refused before anything is written."""
    fine_tune(tmp_path / "a", seed=0)
    fine_tune(tmp_path / "b", seed=1)
    sources = [tmp_path / "a", tmp_path / "b"]
    plain = load_rule_from_dir(weight_soup(sources, tmp_path / "plain"))[0].state_dict()
    out = weight_soup(sources, tmp_path / "b2", net_overrides={"second_moment_decay": 0.95, "direction_clip": 3.0})
    rule, config = load_rule_from_dir(out)
    assert rule.config.second_moment_decay == 0.95 and rule.config.direction_clip == 3.0
    assert config["net"]["hidden_size"] == NET["hidden_size"]
    assert all(torch.equal(value, plain[key]) for key, value in rule.state_dict().items())
    assert config["training"]["soup"]["net_overrides"] == {"second_moment_decay": 0.95, "direction_clip": 3.0}
    assert "`second_moment_decay` 0.999 -> 0.95" in (out / "README.md").read_text()
    assert "net settings changed: second_moment_decay 0.95" in config["description"]
    for overrides, message in (
        ({"hidden_size": 8}, "change the net's weights"),
        ({"second_moment_dacay": 0.9}, "has no field"),
        ({"second_moment_decay": "fast"}, "second_moment_decay"),
    ):
        with pytest.raises(ValueError, match=message):
            weight_soup(sources, tmp_path / "refused", net_overrides=overrides)
    assert not (tmp_path / "refused").exists()
    args = ["soup", *map(str, sources), "--out", str(tmp_path / "cli")]
    assert meta_main([*args, "--net", "second_moment_decay=0.95"]) == 0
    recipe = read_config(tmp_path / "cli")["training"]["soup"]
    assert (
        recipe["net_overrides"] == {"second_moment_decay": 0.95}
        and "--net second_moment_decay=0.95" in recipe["command"]
    )
    capsys.readouterr()
    assert meta_main([*args, "--net", "unroll.lr=1"]) == 2 and meta_main([*args, "--net", "hidden_size=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_the_shipped_soup_is_the_soup_of_its_recorded_ingredients(tmp_path):
    """Provenance of the zoo's soup (the flagship's parent): the ingredients its config records are in the repository
    with the recorded weights (SHA-256), and their soup made today equals the shipped weights bit for bit."""
    root = Path(__file__).resolve().parents[2]
    soup = root / "pretrained" / "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8"
    ingredients = read_config(soup)["training"]["soup"]["ingredients"]
    folders = [root / i["folder"] for i in ingredients]
    assert len(folders) == 8 and [weights_sha256(f) for f in folders] == [i["weights_sha256"] for i in ingredients]
    rebuilt = load_rule_from_dir(weight_soup(folders, tmp_path / "soup"))[0].state_dict()
    shipped = load_rule_from_dir(soup)[0].state_dict()
    assert rebuilt.keys() == shipped.keys() and all(torch.equal(rebuilt[k], shipped[k]) for k in shipped)


def test_the_shipped_flagship_is_a_fine_tune_of_the_shipped_soup_with_its_net_recorded():
    """The flagship's config records the soup as its parent (name, family, net), the one net setting the fine-tune
    changed and the settings changed after training (``training.reconfigured``), which explain every difference from
    the shipped soup, its parent; its optimizer defaults are the ones recorded there (session 41's)."""
    root = Path(__file__).resolve().parents[2]
    flagship = read_config(root / "pretrained" / learned_optim.FLAGSHIP)
    parent = flagship["training"]["parent"]
    soup = read_config(root / "pretrained" / parent["name"])
    assert parent["family"] == soup["family"] == flagship["family"] and parent["net"] == soup["net"]
    changes = {k: v for record in flagship["training"]["reconfigured"] for k, v in record["settings"].items()}
    reconfigured = {k: v for k, v in changes.items() if not k.startswith("optimizer.")}  # net settings
    assert all(flagship["net"][k] == v for k, v in reconfigured.items())
    defaults = {k.removeprefix("optimizer."): v for k, v in changes.items() if k.startswith("optimizer.")}
    assert defaults == {"lr": 0.01, "weight_decay": 0.3} and flagship["optimizer"] == defaults
    changed = {k for k in flagship["net"] if flagship["net"][k] != soup["net"].get(k, flagship["net"][k])}
    assert changed <= set(parent["net_overrides"]) | set(reconfigured)
    assert parent["net_overrides"] == {"newton_schulz_steps": 5} and flagship["net"]["newton_schulz_steps"] == 3
