"""A torch extension build lock left by a killed process no longer hangs every later start
(dist_contrast.distributed.clear_stale_build_locks; found when a failed 2-rank start left
<venv>/torch_extensions/deepspeed_shm_comm/lock and the next run waited on it for good)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from dist_contrast.distributed import clear_stale_build_locks


def _lock(root, age_s: float):
    lock = root / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_stale_lock_is_removed_with_a_line(tmp_path, capsys):
    lock = _lock(tmp_path, age_s=600)
    clear_stale_build_locks(str(tmp_path))
    assert not lock.exists()
    assert f"removed {lock}" in capsys.readouterr().err


def test_a_young_lock_is_waited_on_until_its_build_ends(tmp_path):
    lock = _lock(tmp_path, age_s=0)
    threading.Timer(0.5, lock.unlink).start()  # the build that holds it finishes
    t0 = time.monotonic()
    clear_stale_build_locks(str(tmp_path), stale_s=30, poll_s=0.1)
    assert 0.4 < time.monotonic() - t0 < 10


def test_a_young_lock_nobody_releases_goes_once_it_is_stale(tmp_path):
    lock = _lock(tmp_path, age_s=0)
    t0 = time.monotonic()
    clear_stale_build_locks(str(tmp_path), stale_s=1.0, poll_s=0.1)
    assert not lock.exists() and time.monotonic() - t0 < 10


def test_importing_the_package_clears_a_stale_lock(tmp_path):
    """The check runs where DeepSpeed's CPU op would block: on import, under DS_ACCELERATOR=cpu."""
    lock = _lock(tmp_path, age_s=600)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), DS_ACCELERATOR="cpu")
    run = subprocess.run(
        [sys.executable, "-c", "import dist_contrast.distributed"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert not lock.exists() and "removed" in run.stderr
