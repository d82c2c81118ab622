"""Resolution of checkpoints by Hub repo id (offline, through huggingface_hub's own download code), by zoo
name, and upload with ``push_to_hub`` (the Hub API patched; nothing here touches the network).

The Hub cache is written the way ``huggingface_hub`` writes it::

    <cache>/models--owner--name/
        blobs/<git-sha1 or sha256 of each file>
        refs/main, refs/v1                   (a commit hash, no newline)
        snapshots/<40-hex commit>/<file>     (relative symlinks into blobs/)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch

import learned_optim
from learned_optim import CheckpointError, LearnedOptimizer, save_pretrained
from learned_optim.hub import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

REPO_ID = "owner/name"
COMMIT_MAIN = "1f0c2b7d9e8a6b5c4d3e2f1a0b9c8d7e6f5a4b3c"
COMMIT_V1 = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"


def _blob_name(path: Path) -> str:
    """The blob file name huggingface_hub uses: sha256 for LFS files (weights), git blob sha1 otherwise."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_hub_cache(cache_dir: Path, repo_id: str, checkpoint: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """Store ``checkpoint``'s files as revision ``commit`` of ``repo_id`` in a huggingface_hub cache."""
    owner, name = repo_id.split("/")
    repo = cache_dir / f"models--{owner}--{name}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint.iterdir()):
        blob = repo / "blobs" / _blob_name(file)
        blob.write_bytes(file.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def hub_cache(tmp_path, make_rule):
    """A cache holding REPO_ID at two revisions: ``main`` (RNNProp, lr 0.5) and tag ``v1`` (MLP, lr 2.0)."""
    nets = {"main": make_rule("rnnprop", seed=10), "v1": make_rule("mlp", seed=11)}
    save_pretrained(nets["main"], tmp_path / "main", optimizer_defaults={"lr": 0.5})
    save_pretrained(nets["v1"], tmp_path / "v1", optimizer_defaults={"lr": 2.0})
    cache = tmp_path / "hub-cache"
    add_to_hub_cache(cache, REPO_ID, tmp_path / "main", COMMIT_MAIN, refs=("main",))
    add_to_hub_cache(cache, REPO_ID, tmp_path / "v1", COMMIT_V1, refs=("v1",))
    return cache, nets


def _params():
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.zeros(2))]


# ------------------------------------------------------------------------------------------ Hub download


def test_hub_cache_layout_is_what_huggingface_hub_reads(hub_cache, hf_offline):
    """Sanity check of the fixture with huggingface_hub's own functions."""
    cache, _ = hub_cache
    path = huggingface_hub.hf_hub_download(REPO_ID, CONFIG_NAME, cache_dir=cache)
    assert Path(path).parent.name == COMMIT_MAIN
    assert "rnnprop" in Path(path).read_text()


def test_from_pretrained_hub_repo_offline(hub_cache, hf_offline):
    cache, nets = hub_cache
    opt = learned_optim.from_pretrained(REPO_ID, _params(), cache_dir=cache)
    assert isinstance(opt, LearnedOptimizer) and opt.rule.family == "rnnprop"
    assert _weights_equal(opt.rule, nets["main"])
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize(
    "revision, expected", [("main", "main"), ("v1", "v1"), (COMMIT_V1, "v1"), (COMMIT_MAIN, "main")]
)
def test_revision_pinning(hub_cache, hf_offline, revision, expected):
    """A branch, a tag or a commit hash selects that revision's snapshot."""
    cache, nets = hub_cache
    opt = learned_optim.from_pretrained(REPO_ID, _params(), cache_dir=cache, revision=revision)
    assert opt.rule.family == nets[expected].family
    assert _weights_equal(opt.rule, nets[expected])
    assert opt.param_groups[0]["lr"] == {"main": 0.5, "v1": 2.0}[expected]


@pytest.mark.parametrize(
    "revision, expected", [("main", "main"), ("v1", "v1"), (COMMIT_V1, "v1"), (COMMIT_MAIN, "main"), ("f" * 40, None)]
)
def test_offline_hub_that_lists_the_repo_falls_back_to_the_cache(
    hub_cache, hf_offline, monkeypatch, revision, expected
):
    """huggingface_hub 1.33 raises OfflineModeIsEnabled for a cached commit hash (it lists the repo first): the
    snapshot is then read from the cache, and a revision not there is a CheckpointError, not a network error."""
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    def listing_snapshot_download(*args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/owner/name/tree: offline mode")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", listing_snapshot_download)
    cache, nets = hub_cache
    if expected is None:
        with pytest.raises(CheckpointError, match="not in the local Hub cache"):
            learned_optim.from_pretrained(REPO_ID, _params(), cache_dir=cache, revision=revision)
        return
    opt = learned_optim.from_pretrained(REPO_ID, _params(), cache_dir=cache, revision=revision)
    assert _weights_equal(opt.rule, nets[expected])


@pytest.mark.parametrize("repo_id, revision", [("owner/missing", None), (REPO_ID, "v2"), (REPO_ID, "f" * 40)])
def test_repo_or_revision_not_in_cache_is_a_checkpoint_error(hub_cache, hf_offline, repo_id, revision):
    cache, _ = hub_cache
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        learned_optim.from_pretrained(repo_id, _params(), cache_dir=cache, revision=revision)


def test_a_mistyped_folder_or_an_invalid_repo_id_is_a_checkpoint_error_that_says_so(hub_cache, hf_offline):
    """A relative path that is no folder reads as a Hub repo id: the error says there is no such local folder either;
    a name that is no valid repo id is a CheckpointError too (it was huggingface_hub's HFValidationError)."""
    cache, _ = hub_cache
    with pytest.raises(CheckpointError, match="not in the local Hub cache.*no local folder runs/mymodel"):
        learned_optim.load_rule("runs/mymodel", cache_dir=cache)
    with pytest.raises(CheckpointError, match="not a valid Hub repo id"):
        learned_optim.load_rule("my model/v1!", cache_dir=cache)
    folder = learned_optim.hub.resolve_checkpoint(learned_optim.FLAGSHIP)
    with pytest.raises(CheckpointError, match="local folder, which has no revisions"):
        learned_optim.load_rule(folder, revision="v2")  # it would be recorded as the parent's revision


def test_local_files_only_needs_no_offline_mode(hub_cache, monkeypatch):
    """local_files_only=True reads the cache without any request (the Hub API is made to fail)."""
    cache, nets = hub_cache

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted despite local_files_only=True")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", no_network)
    opt = learned_optim.from_pretrained(REPO_ID, _params(), cache_dir=cache, revision="v1", local_files_only=True)
    assert _weights_equal(opt.rule, nets["v1"])
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        learned_optim.from_pretrained("owner/missing", _params(), cache_dir=cache, local_files_only=True)


def test_bad_checkpoint_in_hub_cache_is_a_checkpoint_error(tmp_path, make_rule, hf_offline):
    """A cached snapshot without weights fails with the checkpoint's own clear error."""
    save_pretrained(make_rule("dm_lstm"), tmp_path / "ck")
    (tmp_path / "ck" / WEIGHTS_NAME).unlink()
    add_to_hub_cache(tmp_path / "cache", "owner/broken", tmp_path / "ck", COMMIT_MAIN, refs=("main",))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not exist"):
        learned_optim.from_pretrained("owner/broken", _params(), cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------ zoo


def test_zoo_name_resolution_and_listing(temp_zoo, hf_offline, monkeypatch, tmp_path):
    root, name = temp_zoo
    (root / "not-a-checkpoint").mkdir()  # folders without config.json are not zoo entries
    entries = learned_optim.list_pretrained()
    assert [e["name"] for e in entries] == [name]
    entry = entries[0]
    assert entry["family"] == "mlp" and entry["description"] == "untrained MLP optimizer (test zoo entry)"
    assert entry["trained_on"] == ["quadratic (test)"] and entry["results"] == {"final_loss": 0.5}
    assert Path(entry["path"]) == root / name
    monkeypatch.chdir(tmp_path)  # the zoo name is not a folder relative to the working directory
    opt = learned_optim.from_pretrained(name, _params())
    reference, _ = learned_optim.load_rule(root / name)
    assert opt.rule.family == "mlp" and _weights_equal(opt.rule, reference)
    with pytest.raises(CheckpointError, match=name):  # the error lists the zoo
        learned_optim.from_pretrained("testzoo-unknown", _params())


def test_zoo_name_with_revision_is_refused(temp_zoo):
    _, name = temp_zoo
    with pytest.raises(CheckpointError, match="no revisions"):
        learned_optim.from_pretrained(name, _params(), revision="v1")


def test_broken_zoo_entry_does_not_break_timm_registration(temp_zoo):
    """A malformed bundled config must not make ``import learned_optim`` fail (it warns instead)."""
    from learned_optim.integrations.timm import register_timm_optimizers

    root, name = temp_zoo
    (root / name / "config.json").write_text("{not json")
    with pytest.warns(RuntimeWarning, match="not registered with timm"):
        assert register_timm_optimizers() == []
    with pytest.raises(CheckpointError, match="not valid JSON"):
        learned_optim.list_pretrained()


def test_empty_zoo(tmp_path, monkeypatch):
    monkeypatch.setattr(learned_optim.hub, "zoo_dir", lambda: tmp_path / "does-not-exist")
    assert learned_optim.list_pretrained() == []


# ------------------------------------------------------------------------------------------ overrides


def test_from_pretrained_overrides_checkpoint_defaults(checkpoint_dir):
    """The checkpoint's "optimizer" defaults apply unless a keyword overrides them."""
    group = learned_optim.from_pretrained(checkpoint_dir, _params()).param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.5, 0.01)
    opt = learned_optim.from_pretrained(checkpoint_dir, _params(), lr=0.1, chunk_size=64, nonfinite="skip")
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.1, 0.01)
    assert (opt.chunk_size, opt.nonfinite) == (64, "skip")
    group = learned_optim.from_pretrained(checkpoint_dir, _params(), weight_decay=0.0).param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.5, 0.0)
    # param groups keep their own settings over the defaults
    a, b = _params()
    opt = learned_optim.from_pretrained(checkpoint_dir, [{"params": [a], "lr": 2.0}, {"params": [b]}])
    assert [g["lr"] for g in opt.param_groups] == [2.0, 0.5]
    with pytest.raises(TypeError):
        learned_optim.from_pretrained(checkpoint_dir, _params(), momentum=0.9)


# ------------------------------------------------------------------------------------------ upload


def test_push_to_hub_uploads_exactly_the_checkpoint(monkeypatch, make_rule, tmp_path, hf_offline):
    """opt.push_to_hub creates the repo and uploads config.json, model.safetensors and README.md only."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload_folder"] = (repo_id, sorted(p.name for p in folder.iterdir()), kwargs)
        copy = tmp_path / "uploaded"
        copy.mkdir()
        for file in folder.iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{'c' * 40}"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    rule = make_rule("dm_lstm", seed=7)
    opt = LearnedOptimizer(_params(), rule)
    url = opt.push_to_hub(
        "me/my-l2o", private=True, name="my-l2o", optimizer_defaults={"lr": 0.3}, commit_message="first upload"
    )
    assert url == f"https://huggingface.co/me/my-l2o/commit/{'c' * 40}"
    assert calls["create_repo"] == ("me/my-l2o", {"private": True, "exist_ok": True})
    repo_id, files, kwargs = calls["upload_folder"]
    assert repo_id == "me/my-l2o" and files == sorted([CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    assert kwargs["commit_message"] == "first upload"
    uploaded = learned_optim.from_pretrained(tmp_path / "uploaded", _params())
    assert _weights_equal(uploaded.rule, rule) and uploaded.param_groups[0]["lr"] == 0.3


def test_push_to_hub_names_what_failed_when_the_hub_cannot_be_reached(monkeypatch, make_rule, hf_offline):
    """The HTTP client's own error (here a stand-in for httpx's ConnectError, which huggingface_hub lets through when
    the network is down) comes as HubUploadError naming the repo, the cause chained; a bad card argument fails before
    the Hub is contacted."""

    class ConnectError(Exception):  # not an OSError, as httpx's is not
        pass

    contacted = []

    def unreachable(self, *args, **kwargs):
        contacted.append(args or kwargs)
        raise ConnectError("[Errno -2] Name or service not known")

    opt = LearnedOptimizer(_params(), make_rule("dm_lstm"))
    for method in ("create_repo", "upload_folder"):
        with monkeypatch.context() as patch:
            patch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)
            patch.setattr(huggingface_hub.HfApi, method, unreachable)
            with pytest.raises(learned_optim.HubUploadError, match="'me/my-l2o'.*ConnectError.*push again") as caught:
                opt.push_to_hub("me/my-l2o")
            assert isinstance(caught.value.__cause__, ConnectError)
    contacted.clear()
    with monkeypatch.context() as patch:
        patch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
        with pytest.raises(TypeError):
            opt.push_to_hub("me/my-l2o", no_such_card_field=1)
    assert not contacted
    with pytest.raises(ValueError) as invalid:  # an invalid repo id is the caller's error, not the Hub's
        opt.push_to_hub("not a repo id//x")
    assert not isinstance(invalid.value, learned_optim.HubUploadError)


def test_from_pretrained_places_the_net_with_the_params_but_never_on_meta(tmp_path):
    """The net follows the params' device; params on the meta device (not materialised) leave it where it is."""
    save_pretrained(learned_optim.RNNProp(hidden_size=4), tmp_path / "ck")
    weights = learned_optim.load_rule(tmp_path / "ck")[0].state_dict()
    for device in ("cpu", "meta"):
        opt = learned_optim.from_pretrained(tmp_path / "ck", torch.nn.Linear(3, 2, device=device).parameters())
        assert all(v.device.type == "cpu" and torch.equal(v, weights[k]) for k, v in opt.rule.state_dict().items())


def test_zoo_separates_general_entries_from_research_reproductions(monkeypatch):
    """list_pretrained labels every entry; from_pretrained on a research entry warns once per process."""
    from learned_optim import hub

    entries = learned_optim.list_pretrained()
    kinds = [e["kind"] for e in entries]
    assert set(kinds) <= {"general", "research"} and kinds == sorted(kinds, key=lambda k: k != "general")
    # the flagship is bundled, general-purpose and listed first
    assert [e["name"] for e in entries if e["flagship"]] == [learned_optim.FLAGSHIP] == [entries[0]["name"]]
    assert entries[0]["kind"] == "general"
    research = [e for e in entries if e["kind"] == "research"]
    assert research and all(e["research"] for e in research)
    monkeypatch.setattr(hub, "_research_warned", set())
    name = research[0]["name"]
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.warns(UserWarning, match=f"{name} is a research reproduction"):
        learned_optim.from_pretrained(name, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learned_optim.from_pretrained(name, params)  # once per process


def test_a_cached_commit_is_read_without_asking_the_hub(hub_cache, monkeypatch):
    """A commit never changes: pinned by its hash and in the cache, it is read without the network, with or without
    offline mode (huggingface_hub retried an unreachable Hub for ~20 s first). A branch still asks the Hub."""
    import huggingface_hub

    calls = []

    def unreachable(*args, **kwargs):
        calls.append(kwargs.get("revision"))
        raise huggingface_hub.errors.LocalEntryNotFoundError("the Hub cannot be reached")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    cache, nets = hub_cache
    opt = learned_optim.from_pretrained(REPO_ID, _params(), cache_dir=cache, revision=COMMIT_V1)
    assert _weights_equal(opt.rule, nets["v1"]) and calls == []
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        learned_optim.from_pretrained(REPO_ID, _params(), cache_dir=cache, revision="v1")
    assert calls == ["v1"]


def test_list_pretrained_gives_a_soups_task_family_from_its_parent(tmp_path, make_rule, monkeypatch):
    """A weight soup (the flagship) records no tasks of its own: its ingredients' parent's are the ones it was
    meta-trained on (list_pretrained gave None)."""
    tasks = {"family": "meta-mix", "kwargs": {"widths": [16]}}
    save_pretrained(make_rule("mlp"), tmp_path / "plain", training={"tasks": tasks})
    soup = {"soup": {"ingredients": []}, "parent": {"name": "plain", "training": {"tasks": tasks}}}
    save_pretrained(make_rule("mlp"), tmp_path / "soup", training=soup)
    save_pretrained(make_rule("mlp"), tmp_path / "bare")
    monkeypatch.setattr(learned_optim.hub, "zoo_dir", lambda: tmp_path)
    trained_on = {e["name"]: e["trained_on"] for e in learned_optim.list_pretrained()}
    assert trained_on == {"plain": tasks, "soup": tasks, "bare": None}


def test_a_saved_card_shows_the_research_warning_and_the_description(tmp_path, make_rule):
    """A research net saved again (e.g. pushed to the Hub) keeps its warning in the card people read, not only in
    config.json; the description is in the card too."""
    save_pretrained(make_rule("mlp"), tmp_path / "a", description="Tuned for digits.", optimizer_defaults={"lr": 1.0})
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({**config, "research": "A reproduction only."}))
    opt = learned_optim.from_pretrained(tmp_path / "a", _params())
    opt.save_pretrained(tmp_path / "b")
    card = (tmp_path / "b" / CARD_NAME).read_text()
    assert "> **Research reproduction, not a general-purpose optimizer.** A reproduction only." in card
    assert "learned optimizer for PyTorch. Tuned for digits." in card
