"""Building the CPU ops (worker.kernels): a lock left by a build that died does not hang every
later start, and the folder whose lock is checked is the one the ops are built in."""

from __future__ import annotations

import os
import time

import pytest

from worker import kernels


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    assert not kernels.clear_stale_lock(tmp_path)  # no lock
    lock = tmp_path / "lock"
    lock.touch()
    assert not kernels.clear_stale_lock(tmp_path) and lock.exists()  # a build running now
    old = time.time() - kernels.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert kernels.clear_stale_lock(tmp_path) and not lock.exists()


@pytest.mark.skipif(not kernels.load(), reason="the CPU kernels cannot be built here (no g++/ninja)")
def test_the_ops_are_built_in_the_folder_whose_lock_is_checked():
    folder = kernels.build_dir()
    assert (folder / f"{folder.name}.so").exists()
    assert not (folder / "lock").exists()  # the build gave its lock back
