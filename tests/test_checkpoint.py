"""Checkpoint files: atomic, checksummed, and careful with what they replace.

Real deaths are staged in child processes: one ``os._exit``\\ s after writing part of a checkpoint
(deterministic; run against the naive ``torch.save(obj, path)`` too, to show the test detects a torn
file), and one is killed with SIGKILL from outside while it saves a large checkpoint in a loop. Then:
bit flips, special files, symlinks, modes, write errors, interrupts, stale temporary files and the
error messages of bad paths.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
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
        header = 56
        assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1_500_000 + header
        gp.save_checkpoint({"version": 3, "data": torch.full((5,), 3, dtype=torch.int32),
                            "end": 3}, path)
        assert_intact(path, version=3)
        assert temp_files(tmp_path) == []               # the dead process's temp file is gone
    else:                                               # the control: a torn file
        assert path.stat().st_size == 1_500_000
        with pytest.raises(gp.CheckpointError, match="is not a checkpoint"):
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


# ---------------------------------------------------------------- corruption
def trained_pruner() -> gp.Pruner:
    p = gp.Pruner(200, keep=0.3, policy="infobatch", num_epochs=6, seed=2)
    for epoch in range(3):
        plan = p.plan(epoch)
        p.observe(plan.indices, torch.linspace(0.1, 3.0, len(plan)))
    return p


def test_every_flipped_byte_of_a_checkpoint_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    gp.save_checkpoint({"pruner": trained_pruner().state_dict()}, path)
    good = path.read_bytes()
    rng = random.Random(0)
    positions = [0, 15, 16, 47, 48, 55, 56] + rng.sample(range(len(good)), 30)
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(bad))
        with pytest.raises(gp.CheckpointError, match=str(path)):
            gp.load_checkpoint(path)
    path.write_bytes(good[:-10])
    with pytest.raises(gp.CheckpointError, match="truncated"):
        gp.load_checkpoint(path)
    path.write_bytes(good)
    assert "pruner" in gp.load_checkpoint(path)


def test_a_changed_state_dict_fails_its_checksum_and_changes_nothing():
    p = trained_pruner()
    state = p.state_dict()
    state["stats"]["mean"][3] = 1.27e38                   # what a flipped exponent bit did in 0.1
    q = trained_pruner()
    before = q.state_dict()
    with pytest.raises(ValueError, match="checksum"):
        q.load_state_dict(state)
    assert q.state_dict()["checksum"] == before["checksum"]


# ---------------------------------------------------------------- what a save replaces
def payload(v: int) -> dict:
    return {"version": v, "data": torch.full((4,), v, dtype=torch.int32), "end": v}


def test_save_refuses_a_fifo_and_a_directory_and_leaves_them(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        gp.save_checkpoint(payload(1), fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(ValueError, match="is a directory"):
        gp.save_checkpoint(payload(1), tmp_path)
    assert temp_files(tmp_path) == []


def test_save_refuses_a_character_device_and_leaves_it(tmp_path):
    dev = tmp_path / "chardev"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))   # a device node of our own
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot create a device node here: {e}")
    with pytest.raises(ValueError, match="not a regular file"):
        gp.save_checkpoint(payload(1), dev)
    assert stat.S_ISCHR(dev.stat().st_mode)


def test_save_writes_through_a_symlink_atomically(tmp_path):
    target = tmp_path / "real" / "ckpt.pt"
    target.parent.mkdir()
    gp.save_checkpoint(payload(1), target)
    link = tmp_path / "latest.pt"
    link.symlink_to(target)
    gp.save_checkpoint(payload(2), link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert_intact(target, version=2)
    assert_intact(link, version=2)
    dangling = tmp_path / "next.pt"
    dangling.symlink_to(tmp_path / "real" / "new.pt")
    gp.save_checkpoint(payload(3), dangling)
    assert dangling.is_symlink()
    assert_intact(tmp_path / "real" / "new.pt", version=3)


def test_save_keeps_the_existing_files_mode(tmp_path):
    path = tmp_path / "ckpt.pt"
    gp.save_checkpoint(payload(1), path)
    os.chmod(path, 0o600)
    gp.save_checkpoint(payload(2), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert_intact(path, version=2)


def test_a_name_of_240_characters_saves(tmp_path):
    path = tmp_path / ("c" * 237 + ".pt")
    gp.save_checkpoint(payload(1), path)
    assert_intact(path, version=1)


def test_a_missing_directory_is_named_in_the_error(tmp_path):
    path = tmp_path / "nowhere" / "ckpt.pt"
    with pytest.raises(FileNotFoundError, match=r"cannot save checkpoint .*nowhere/ckpt.pt.*does not exist"):
        gp.save_checkpoint(payload(1), path)


# ---------------------------------------------------------------- write errors and interrupts
FILE_SIZE_LIMIT = """
    import resource
    save_checkpoint(payload(1, 1000), path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    try:
        save_checkpoint(payload(2, 1 << 20), path)
    except OSError as e:
        print("OSError", e.errno, e)
"""


def test_a_file_size_limit_is_an_oserror_naming_the_path_and_the_cause(tmp_path):
    path = tmp_path / "ckpt.pt"
    proc = child(FILE_SIZE_LIMIT, path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.startswith(f"OSError {errno.EFBIG} ") and str(path) in out and "too large" in out, out
    assert_intact(path, version=1)
    assert temp_files(tmp_path) == []


class _FullFile:
    """Stands in for the OS from the n-th write on: the file's write fails with ENOSPC (a full disk
    cannot be staged on this machine's file system without mount privileges)."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def _fail_after(monkeypatch, after: int = 3) -> None:
    from gpuprune import checkpoint
    real = checkpoint._HashingWriter.write
    calls = {"n": 0}

    def write(self_, data):
        calls["n"] += 1
        if calls["n"] == after:
            self_.f = _FullFile(self_.f)
        return real(self_, data)
    monkeypatch.setattr(checkpoint._HashingWriter, "write", write)


def test_a_full_disk_is_an_oserror_naming_the_path_and_the_cause(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    gp.save_checkpoint(payload(1), path)
    _fail_after(monkeypatch)
    with pytest.raises(OSError, match=r"cannot save checkpoint .*ckpt.pt.*: no space left") as info:
        gp.save_checkpoint(payload(2), path)
    assert info.value.errno == errno.ENOSPC
    assert "enforce fail" not in str(info.value)
    assert_intact(path, version=1)
    assert temp_files(tmp_path) == []


def test_ctrl_c_during_a_save_arrives_as_keyboardinterrupt(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    gp.save_checkpoint(payload(1), path)
    from gpuprune import checkpoint
    real = checkpoint._HashingWriter.write
    sent = {"done": False}

    def write(self_, data):
        if not sent["done"]:
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGINT)       # a real SIGINT, handled by Python
        return real(self_, data)
    monkeypatch.setattr(checkpoint._HashingWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        gp.save_checkpoint(payload(2), path)
    assert_intact(path, version=1)
    assert temp_files(tmp_path) == []


def test_stale_temp_files_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    path = tmp_path / "ckpt.pt"
    gp.save_checkpoint(payload(1), path)
    from gpuprune.checkpoint import _temp_prefix
    prefix = _temp_prefix(str(path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f"{prefix}{dead}.0123abcd.tmp"
        busy = tmp_path / f"{prefix}{live.pid}.89abcdef.tmp"
        other = tmp_path / f".gpuprune-0000000000000000.{dead}.0123abcd.tmp"   # another target's
        mine = tmp_path / "notes.tmp"
        for f in (stale, busy, other, mine):
            f.write_bytes(b"x" * 100)
        gp.save_checkpoint(payload(2), path)
        assert not stale.exists()
        assert busy.exists() and other.exists() and mine.exists()
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------- loading what is not a checkpoint
def test_loading_a_text_file_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("epoch 3, loss 0.25\n" * 10)
    with pytest.raises(gp.CheckpointError, match=rf"checkpoint '{path}' .*not a checkpoint"):
        gp.load_checkpoint(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(gp.CheckpointError, match="empty.pt"):
        gp.load_checkpoint(empty)


def test_two_threads_saving_to_one_path_both_succeed(tmp_path):
    """An asynchronous checkpoint thread beside the training loop: each save's temporary file is
    its own, so neither thread's clean-up removes the other's live file (0.2 lost 39 of 80)."""
    import threading

    path = tmp_path / "ck.pt"
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def saver(tag: int) -> None:
        start.wait()
        for i in range(40):
            try:
                gp.save_checkpoint({"tag": tag, "i": i, "t": torch.full((2000,), float(i))}, path)
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    threads = [threading.Thread(target=saver, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    state = gp.load_checkpoint(path)
    assert state["i"] == 39 and state["tag"] in (0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]     # no temporary file left


@pytest.mark.parametrize("name", ["ck/", "ck" + os.sep + os.sep, "sub/.", "sub/.."])
def test_save_refuses_a_directory_like_path_even_when_it_does_not_exist(tmp_path, name):
    target = tmp_path / "x"
    target.mkdir()
    (target / "sub").mkdir()
    path = str(target) + os.sep + name
    with pytest.raises(ValueError, match="names a directory"):
        gp.save_checkpoint({}, path)
    assert sorted(p.name for p in target.iterdir()) == ["sub"]           # nothing written
