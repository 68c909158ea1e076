"""Atomic checkpoints: a process that dies while saving leaves the previous checkpoint intact.

Two real deaths are staged in child processes: one ``os._exit``\\ s after writing part of a
checkpoint (deterministic; run against the naive ``torch.save(obj, path)`` too, to show the test
detects a torn file), and one is killed with SIGKILL from outside while it saves a large checkpoint
in a loop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gpuprune as gp

REPO = Path(__file__).resolve().parents[1]

# The payload of version v is full of v, so a torn or mixed file is detected by its contents.
CHILD_PRELUDE = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {repo!r})
    from gpuprune.checkpoint import save_checkpoint
    path = {path!r}

    def payload(v, n):
        return {{"version": v, "data": torch.full((n,), v, dtype=torch.int32), "end": v}}
""")


def child(script: str, path: Path, **fmt) -> subprocess.Popen:
    code = CHILD_PRELUDE.format(repo=str(REPO), path=str(path)) + textwrap.dedent(script).format(**fmt)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def assert_intact(path: Path, version: int | None = None) -> int:
    state = gp.load_checkpoint(path)
    v = state["version"]
    assert state["end"] == v and bool((state["data"] == v).all())
    if version is not None:
        assert v == version
    return v


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp"))


DIE_MIDWAY = """
    import torch
    save_checkpoint(payload(1, 1 << 20), path)          # a good checkpoint first
    real_save = torch.save

    class DieMidway:
        # a file whose process exits for good after {limit} more bytes
        def __init__(self, f):
            self.f, self.left = f, {limit}
        def write(self, b):
            b = bytes(b)
            if len(b) >= self.left:
                self.f.write(b[:self.left]); self.f.flush(); os._exit(17)
            self.left -= len(b)
            return self.f.write(b)
        def flush(self):
            self.f.flush()

    torch.save = lambda obj, f, **kw: real_save(obj, DieMidway(f), **kw)
    if {atomic}:
        save_checkpoint(payload(2, 1 << 20), path)
    else:                                                # what torch.save(obj, path) does
        with open(path, "wb") as f:
            torch.save(payload(2, 1 << 20), f)
    print("not reached")
"""


@pytest.mark.parametrize("atomic", [True, False], ids=["save_checkpoint", "naive-torch.save"])
def test_process_dying_midway_through_a_save(atomic, tmp_path):
    path = tmp_path / "ckpt.pt"
    proc = child(DIE_MIDWAY, path, limit=1_500_000, atomic=atomic)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 17, err
    assert "not reached" not in out
    if atomic:
        assert_intact(path, version=1)                  # the old checkpoint, whole
        leftovers = temp_files(tmp_path)
        assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1_500_000
        gp.save_checkpoint({"version": 3, "data": torch.full((5,), 3, dtype=torch.int32),
                            "end": 3}, path)           # a stray temp file does not get in the way
        assert_intact(path, version=3)
    else:                                               # the control: a torn file
        assert path.stat().st_size == 1_500_000
        with pytest.raises(ValueError, match="truncated or not a torch checkpoint"):
            gp.load_checkpoint(path)


SAVE_FOREVER = """
    v = 0
    while True:
        v += 1
        save_checkpoint(payload(v, {n}), path)
        print(v, flush=True)
"""


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that saves a 32 MiB checkpoint in a loop, at a moment it is writing one."""
    path = tmp_path / "ckpt.pt"
    caught_mid_write = 0
    for attempt in range(3):
        proc = child(SAVE_FOREVER, path, n=8 << 20)
        try:
            deadline = time.monotonic() + 60
            while not path.exists() or not temp_files(tmp_path):   # saved once, writing again
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the child never started a second save"
                time.sleep(0.002)
            time.sleep(0.01 * attempt)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        last_done = int(proc.stdout.read().split()[-1])
        v = assert_intact(path)
        assert v in (last_done, last_done + 1)          # the last completed save (or its rename)
        leftovers = temp_files(tmp_path)
        caught_mid_write += bool(leftovers)
        if caught_mid_write:
            break
        path.unlink()                                   # the next attempt starts afresh
    assert caught_mid_write >= 1                        # at least one kill landed inside a save


def test_save_replaces_atomically_and_cleans_up_on_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    gp.save_checkpoint({"version": 1, "data": torch.ones(3, dtype=torch.int32), "end": 1}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask   # like a plain open(), not 0600
    with pytest.raises(Exception):
        gp.save_checkpoint({"version": 2, "bad": lambda: None}, path)   # cannot be pickled
    assert_intact(path, version=1)
    assert temp_files(tmp_path) == []
    gp.save_checkpoint({"version": 2, "data": torch.full((3,), 2, dtype=torch.int32), "end": 2},
                       str(path))
    assert_intact(path, version=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


class Custom:
    """Not a tensor or a plain container: weights_only loading refuses it."""


def test_load_checkpoint_map_location_and_weights_only(tmp_path):
    path = tmp_path / "ckpt.pt"
    pruner = gp.Pruner(20, keep=0.5, seed=1)
    pruner.plan(0)
    gp.save_checkpoint({"pruner": pruner.state_dict(), "note": "x"}, path)
    state = gp.load_checkpoint(path, map_location="cpu")
    fresh = gp.Pruner(20, keep=0.5, seed=1)
    fresh.load_state_dict(state["pruner"])
    assert torch.equal(fresh.plan(0).indices, pruner.plan(0).indices)

    gp.save_checkpoint({"obj": Custom()}, path)
    with pytest.raises(ValueError, match="cannot be unpickled"):
        gp.load_checkpoint(path)                        # weights_only=True by default
    assert isinstance(gp.load_checkpoint(path, weights_only=False)["obj"], Custom)
