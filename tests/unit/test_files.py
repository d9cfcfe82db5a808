"""Files replaced whole (`cytoloop.files`): a process killed mid-write leaves the old file as it was."""

import signal
import subprocess
import sys

import pytest

from cytoloop.files import replaced, write_text

KILLED_MID_WRITE = """
import os, signal, sys
from cytoloop.files import replaced

with replaced(sys.argv[1]) as handle:
    handle.write('[{"model_version": "2"')  # half of the new file
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "flags.json"
    write_text(path, "[]")
    child = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(path)], capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert path.read_text() == "[]"


def test_an_error_in_the_block_changes_nothing_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "manifest.csv"
    write_text(path, "old")
    path.chmod(0o640)
    with pytest.raises(RuntimeError), replaced(path) as handle:
        handle.write("new, half")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]
    write_text(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640  # the replaced file's mode kept
    write_text(tmp_path / "sub" / "fresh.txt", "x")  # the folder is created; a new file is world-readable
    assert (tmp_path / "sub" / "fresh.txt").stat().st_mode & 0o777 == 0o644
