"""The README's Python examples run as written (from a fresh working directory)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_usage_and_adapt_examples():
    assert any("from_pretrained(" in b for b in BLOCKS) and any("adapt(" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
    for config in tmp_path.glob("*/config.json"):  # a block that saves: the checkpoint loads
        import learned_optim

        learned_optim.load_rule(config.parent)
        if "adapt(" in BLOCKS[index]:
            assert json.loads(config.read_text())["training"]["adaptation"]
