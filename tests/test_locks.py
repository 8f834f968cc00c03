"""nrrdd.io.file_lock: what lets several ``nrrdd compare`` (and study) processes share one grid."""
import errno
from unittest import mock

import pytest

from nrrdd.io import file_lock


def test_a_held_lock_is_refused_without_waiting_and_free_once_released(tmp_path):
    lock = tmp_path / "locks" / "run.lock"                   # its folder is made
    with file_lock(lock) as mine:
        assert mine
        with file_lock(lock, block=False) as other:         # another open file: as another process would
            assert other is False
    with file_lock(lock, block=False) as again:
        assert again


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path):
    with mock.patch("fcntl.flock", side_effect=OSError(errno.ENOLCK, "No locks available")):
        with pytest.warns(UserWarning, match="does not lock files"):
            with file_lock(tmp_path / "x.lock", block=False) as mine:
                assert mine
    with mock.patch("fcntl.flock", side_effect=OSError(errno.EIO, "I/O error")):
        with pytest.raises(OSError, match="I/O error"):
            with file_lock(tmp_path / "x.lock"):
                pass
