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
    import os

    from cytoloop.files import STALE_S

    path = tmp_path / "flags.json"
    write_text(path, "[]")
    child = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(path)], capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert path.read_text() == "[]"
    [left] = tmp_path.glob(".flags.json.*.tmp")  # the killed writer's temporary file
    write_text(path, "[1]")
    assert left.exists()  # too young to be a dead writer's for sure
    os.utime(left, (left.stat().st_atime - STALE_S - 1, left.stat().st_mtime - STALE_S - 1))
    write_text(path, "[2]")
    assert not left.exists() and path.read_text() == "[2]"


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
    write_text(tmp_path / "sub" / "fresh.txt", "x")  # the folder is created; a new file gets the umask's mode
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "sub" / "fresh.txt").stat().st_mode & 0o777 == 0o666 & ~umask


KILLED_WHILE_SAVING_WEIGHTS = """
import os, signal, sys
import torch
from cytoloop.models.base import write_model_dir

def save_half(state, target):  # torch.save killed half-way through the weights (to a file name, or a handle)
    handle = open(target, "wb") if isinstance(target, (str, os.PathLike)) else target
    handle.write(b"PK\\x03\\x04 half a zip of tensors")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_half
write_model_dir(sys.argv[1], {}, {})
"""


def test_a_model_whose_weights_are_rewritten_and_killed_half_way_still_loads(tmp_path, tiny_settings):
    """`cytoloop tune` rewrites an accepted model's weights (`write_model_dir`): written in place, a kill (or a
    full disk) half-way left a truncated weights.pt, a model that loaded no more."""
    import hashlib

    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.models.loading import load_model

    BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline).save(tmp_path / "model")
    weights = tmp_path / "model" / "weights.pt"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    script = KILLED_WHILE_SAVING_WEIGHTS
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")], capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
    assert load_model(tmp_path / "model").classes == ["a", "b"]


def test_a_lock_is_re_entrant_in_its_thread_and_excludes_other_threads(tmp_path):
    """A retrain holds the fine-tune lock while it decides and records its outcome, and `run_finetune` inside it
    takes the lock again: a second flock of the file through another handle would wait on the first for ever."""
    import threading

    from cytoloop.files import Locked, locked

    lock, seen = tmp_path / "scope.lock", []
    with locked(lock):
        with locked(lock, wait=False):  # the same thread: taken again at once
            seen.append("inner")

        def elsewhere():
            try:
                with locked(lock, wait=False):
                    seen.append("other thread got it")
            except Locked:
                seen.append("other thread refused")

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    assert seen == ["inner", "other thread refused"]
    with locked(lock, wait=False):  # released by the outer block, not by the inner one
        seen.append("free")
    with locked(lock, reentrant=False):  # an owner's lock: not shared with a second taker, even in its thread
        with pytest.raises(Locked, match="held by this thread already"):
            with locked(lock, reentrant=False):
                pass
    assert lock.exists()  # kept: removing it would let two processes lock two different files
