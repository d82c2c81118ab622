"""learned_optim._files.write_atomically: the one writer of files other processes may read."""

from __future__ import annotations

import os
import sys

import pytest

from learned_optim._files import write_atomically


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_written_files_get_the_permissions_of_a_plain_open_and_leave_no_temporary(tmp_path):
    """Run records, checkpoints and reports are read by other users (a shared --baseline-dir): they get the mode
    ``open`` gives a new file, not the 0600 of a ``mkstemp`` temporary file."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    write_atomically(tmp_path / "bytes.json", b"{}")
    write_atomically(tmp_path / "written.bin", lambda path: path.write_bytes(b"data"))
    for name in ("bytes.json", "written.bin"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
    assert (tmp_path / "written.bin").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bytes.json", "plain", "written.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def failing(path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, failing)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
