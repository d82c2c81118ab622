"""The benchmark suite's tasks: each builds and trains 3 steps with Adam and a learned optimizer; splits
are disjoint and deterministic; models and batches are reproducible from a seed."""

from __future__ import annotations

import hashlib

import pytest
import torch

import learned_optim
from learned_optim.bench import QUICK, TASKS, get_task
from learned_optim.bench import data as bdata
from learned_optim.bench.tasks import SELECTION_TASKS, UnknownTaskError


@pytest.fixture(scope="module")
def workloads():
    return {name: task.bind(steps=3) for name, task in TASKS.items()}


def test_the_suite_covers_the_issue():
    assert len(TASKS) >= 12
    kinds = {t.kind for t in TASKS.values()}
    assert {"classify", "regress", "autoencode", "sequence", "lm"} <= kinds
    assert any(t.bf16 for t in TASKS.values())
    assert set(QUICK) <= set(TASKS)
    assert min(t.steps for t in TASKS.values()) >= 500 and max(t.steps for t in TASKS.values()) >= 5000


def test_sizes_span_10k_to_2m_parameters(workloads):
    sizes = [w.num_parameters for w in workloads.values()]
    assert min(sizes) >= 10_000 and max(sizes) >= 2_000_000


@pytest.mark.parametrize("name", list(TASKS))
def test_task_trains_three_steps_with_adam_and_a_learned_optimizer(name, workloads):
    w = workloads[name]
    for make in (lambda p: torch.optim.Adam(p, lr=1e-3), lambda p: learned_optim.from_pretrained("l2o-mlp", p)):
        model = w.build_model(0)
        before = [p.detach().clone() for p in model.parameters()]
        opt = make(list(model.parameters()))
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            batch = w.batch(gen)
            opt.zero_grad()
            loss = w.loss(model, batch)
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
            loss.backward()
            opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_models_and_batches_are_reproducible_from_the_seed(workloads):
    w = workloads["addition-lstm"]
    a, b, c = w.build_model(3), w.build_model(3), w.build_model(4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    x1, _ = w.batch(torch.Generator().manual_seed(5))
    x2, _ = w.batch(torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2)


def _rows(x: torch.Tensor) -> set[bytes]:
    flat = x.reshape(len(x), -1).contiguous()
    return {hashlib.sha1(r.numpy().tobytes()).digest() for r in flat}


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.kind != "lm"])
def test_array_splits_are_disjoint_and_deterministic(name, workloads):
    splits = workloads[name].splits
    rows = {s: _rows(splits.x[s]) for s in bdata.SPLITS}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    again = TASKS[name].data.func.__wrapped__(*TASKS[name].data.args, **TASKS[name].data.keywords)
    assert again.fingerprint == splits.fingerprint


def test_text_corpus_is_split_by_file_and_deterministic():
    files = [set(v) for v in bdata.STDLIB_FILES.values()]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    corpus = bdata.stdlib_corpus()
    assert all(len(corpus.tokens[s]) > 50_000 for s in bdata.SPLITS)
    assert bdata.stdlib_corpus.__wrapped__().fingerprint == corpus.fingerprint


def test_label_noise_only_in_train_and_val():
    clean, noisy = bdata.tabular("classification40"), bdata.tabular("classification40", label_noise=0.3)
    assert torch.equal(clean.y["test"], noisy.y["test"])
    for split in ("train", "val"):
        flipped = (clean.y[split] != noisy.y[split]).float().mean()
        assert 0.25 < flipped < 0.35


def test_config_hash_changes_with_the_task():
    task = get_task("diabetes-mlp")
    assert task.bind(steps=10).config_hash == task.bind(steps=10).config_hash
    assert task.bind(steps=10).config_hash != task.bind(steps=11).config_hash
    assert task.bind(steps=10).config_hash != get_task("breast-cancer-mlp").bind(steps=10).config_hash


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UnknownTaskError, match="known: diabetes-mlp"):
        get_task("nosuch")


def test_missing_data_root(tmp_path):
    with pytest.raises(bdata.DataRootError, match="lacks the standard-library files"):
        bdata.stdlib_corpus(str(tmp_path))


def test_data_bits_do_not_depend_on_the_thread_count():
    task = get_task("shapes-cnn")
    one = task.bind(steps=5).config_hash
    bdata.shapes.cache_clear()
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = task.bind(steps=5).config_hash
    finally:
        torch.set_num_threads(previous)
    assert one == two


def test_the_selection_set_is_apart_from_the_suite():
    """Recipes are chosen on tasks the suite never reports: other names, other (data, model) pairs, other text."""
    assert not set(SELECTION_TASKS) & set(TASKS)
    suite = {(repr(t.spec()["data"]), repr(t.spec()["model"])) for t in TASKS.values()}
    assert not suite & {(repr(t.spec()["data"]), repr(t.spec()["model"])) for t in SELECTION_TASKS.values()}
    suite_files = {f for files in bdata.STDLIB_FILES.values() for f in files}
    selection_files = [set(files) for files in bdata.SELECTION_STDLIB_FILES.values()]
    assert not suite_files & set().union(*selection_files)
    assert not (selection_files[0] & selection_files[1]) and not (selection_files[1] & selection_files[2])
    lm = [t for t in SELECTION_TASKS.values() if t.kind == "lm"]
    assert lm and all(t.bind(steps=3).splits.fingerprint != bdata.stdlib_corpus().fingerprint for t in lm)
    with pytest.raises(UnknownTaskError, match="selection-set task 'diabetes-mlp'; known: select-"):
        get_task("diabetes-mlp", selection=True)


@pytest.mark.parametrize("name", list(SELECTION_TASKS))
def test_selection_task_trains_three_steps(name):
    w = SELECTION_TASKS[name].bind(steps=3)
    model = w.build_model(0)
    opt = learned_optim.from_pretrained("adafac-mlp-adam-magnitude-tbv", model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = w.loss(model, w.batch(gen))
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
