"""flash_core.files: atomic writes keep the old file on failure, follow the umask, name a full disk; orphaned
temporaries of a killed writer are removed; one run per output (a second one is refused, naming the holder)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from flash_core import files


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "lora.safetensors"
    files.write_text_atomic(target, "good")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as out:
            out.write("half")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        files.write_atomic(target, broken)
    assert target.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_full_disk_names_the_file_and_what_to_do(tmp_path):
    target = tmp_path / "state.flashckpt"
    files.write_text_atomic(target, "previous")

    def full(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.FileWriteError) as error:
        files.write_atomic(target, full)
    message = str(error.value)
    assert str(target) in message and "disk is full" in message and "unchanged" in message
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.flashckpt"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        files.write_text_atomic(tmp_path / "a.txt", "x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask


def test_sigkill_during_a_write_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    """A writer killed between writing and renaming leaves a full-size .tmp- file; starting again cleans it."""
    target = tmp_path / "out" / "state.flashckpt"
    script = textwrap.dedent(f"""
        import sys, time
        from flash_core import files
        def slow(tmp):
            with open(tmp, "wb") as out:
                out.write(b"x" * 1_000_000)
            print("written", flush=True)
            time.sleep(60)
        files.write_atomic({str(target)!r}, slow)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "written"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    leftovers = [p for p in target.parent.iterdir() if p.name.startswith(files.TEMP_PREFIX)]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 1_000_000 and not target.exists()
    with files.OutputLock(target.parent):
        removed = files.remove_orphaned_temporaries(target.parent)
    assert removed == [str(leftovers[0])]
    assert not any(p.name.startswith(files.TEMP_PREFIX) for p in target.parent.iterdir())


def test_a_second_run_on_the_same_output_is_refused_and_told_who_holds_it(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from flash_core import files
        with files.OutputLock({str(tmp_path)!r}, what="flash-distill --config first.yaml"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(files.OutputLockedError) as error:
            files.OutputLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(error.value) and "first.yaml" in str(error.value)
        holder.send_signal(signal.SIGKILL)  # a killed holder releases the lock (the kernel drops the flock)
        holder.wait(timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                with files.OutputLock(tmp_path):
                    break
            except files.OutputLockedError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        holder.kill()


def test_a_waiting_lock_says_who_it_waits_for_then_gets_the_folder_when_the_holder_ends(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from flash_core import files
        with files.OutputLock({str(tmp_path)!r}, what="training the digits teacher"):
            print("locked", flush=True)
            sys.stdin.readline()  # holds the lock until told
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        waited: list[str] = []

        def release_when_waited(holder_description: str) -> None:
            waited.append(holder_description)
            holder.stdin.write("done\n")
            holder.stdin.flush()

        with files.OutputLock(tmp_path, wait=True, on_wait=release_when_waited):
            assert len(waited) == 1 and f"pid {holder.pid}" in waited[0] and "digits teacher" in waited[0]
            assert holder.wait(timeout=30) == 0  # it got the lock only after the holder let go
    finally:
        holder.kill()


def test_replace_folder_atomic_swaps_a_whole_checkpoint_folder(tmp_path):
    final, staging = tmp_path / "step-000002", tmp_path / ".tmp-step-000002"
    final.mkdir()
    (final / "trainer.pt").write_text("old")
    staging.mkdir()
    (staging / "trainer.pt").write_text("new")
    files.replace_folder_atomic(staging, final)
    assert (final / "trainer.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]


def test_a_kill_between_the_two_renames_of_a_folder_swap_keeps_the_previous_checkpoint(tmp_path):
    """replace_folder_atomic renames the old checkpoint aside, then the new one in. A writer killed between the
    two renames left neither under the checkpoint's name, and the next start removed both as temporaries; the
    next start now puts the set-aside (complete) copy back, and only then clears the staging folder."""
    from flash_core.checkpoints import CheckpointStore

    root = tmp_path / "checkpoints"
    final, staging = root / "step-000002", root / ".tmp-step-000002"
    for folder, content in ((final, "old"), (staging, "new")):
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": 2, "which": content}))
    script = textwrap.dedent(f"""
        import os, signal
        from flash_core import files
        renames = []
        real_replace = os.replace
        def replace_then_die(src, dst):
            if renames:  # the second rename: killed before it happens
                os.kill(os.getpid(), signal.SIGKILL)
            renames.append(src)
            real_replace(src, dst)
        files.os.replace = replace_then_die
        files.replace_folder_atomic({str(staging)!r}, {str(final)!r})
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == -signal.SIGKILL
    assert not final.exists() and (root / ".tmp-step-000002.old" / "meta.json").is_file()  # killed in between
    with files.OutputLock(root):
        removed = files.remove_orphaned_temporaries(root)  # what the next run does when it starts
    assert json.loads((final / "meta.json").read_text())["which"] == "old"
    assert removed == [str(staging)] and sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-000002"]
    assert CheckpointStore(root).latest() == final


def test_move_folder_into_place_keeps_the_first_complete_folder(tmp_path):
    # two processes building the same cached model: the first one's folder stays, the second is told so
    final = tmp_path / "tiny-sd15"
    for name, content in (("first", "1"), ("second", "2")):
        staging = tmp_path / f".tmp-tiny-sd15.{name}"
        staging.mkdir()
        (staging / "model_index.json").write_text(content)
        assert files.move_folder_into_place(staging, final) is (name == "first")
    assert (final / "model_index.json").read_text() == "1"
    assert (tmp_path / ".tmp-tiny-sd15.second" / "model_index.json").is_file()  # the caller removes it


def test_move_folder_into_place_names_the_target_when_it_cannot_move(tmp_path):
    with pytest.raises(files.FileWriteError, match="tiny-sd15"):
        files.move_folder_into_place(tmp_path / ".tmp-missing", tmp_path / "tiny-sd15")


@pytest.fixture()
def small_disk(tmp_path):
    """A real 64 KiB tmpfs (root only): writes on it fail the way a full disk fails."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    try:
        yield mount_point
    finally:  # lazy: detached even if something still holds it, so the temporary folder can be removed
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_real_full_disk_names_the_file_and_keeps_the_previous_version(small_disk, writer):
    """torch.save (RuntimeError from its C++ writer) and safetensors (SafetensorError) on a really full disk give
    the one clear FileWriteError, not the library's message; the previous file and no temporary are left."""
    import torch
    from safetensors.torch import save_file

    target = small_disk / "state.flashckpt"
    files.write_text_atomic(target, "previous")
    big = {"x": torch.zeros(100_000)}
    save = (lambda tmp: torch.save(big, tmp)) if writer == "torch.save" else (lambda tmp: save_file(big, tmp))
    with pytest.raises(files.FileWriteError, match=r"state\.flashckpt.*the disk is full") as error:
        files.write_atomic(target, save)
    assert error.value.errno == errno.ENOSPC
    assert target.read_text() == "previous"
    assert [p.name for p in small_disk.iterdir()] == ["state.flashckpt"]
