"""Every file the pack writes goes through here: atomic writes, the umask, orphans, full disks, output locks.

* `write_atomic`: a temporary file in the target's folder, flushed to disk, then os.replace. Readers
  (ComfyUI's model lists, a resumed run, a crash) see the old file or the new one, never half a file; a
  failed write leaves no temporary file behind and the previous file untouched. Temporary names start with
  ".tmp-" (hidden, and never a model extension, so ComfyUI's lists do not show them). The result gets the
  mode a plain `open(path, "w")` would give (0666 minus the umask), not mkstemp's private 0600.
* A full disk (or any OS error) raises `FileWriteError`, which names the file and what to do.
* Folders (a checkpoint, a diffusers pipeline) are written under a ".tmp-" name next to their target, then
  moved in whole: `replace_folder_atomic` (replaces an older one) or `move_folder_into_place` (the first
  writer wins).
* `remove_orphaned_temporaries`: a process killed during a write (SIGKILL, power loss) leaves its ".tmp-"
  file behind; the next run of the same output removes them when it starts (it holds the output's lock,
  so no live writer can own them). A folder swap killed between its two renames left the previous complete
  folder set aside: it is put back first (`recover_interrupted_swaps`), never deleted.
* `OutputLock`: one training run per output; a second one refuses and names the holder. The lock is an
  flock on a file in the output folder, released by the kernel when the holder dies, so a killed run
  never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".flash.lock"


class FileWriteError(OSError):
    """A file could not be written; the message names it, the cause and what to do."""


class OutputLockedError(RuntimeError):
    """Another live run holds the output's lock; the message names it (pid, host, start time)."""


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def write_error(path: str, err: OSError) -> FileWriteError:
    """The one message for a failed write: which file, why, what to do (the previous file is kept)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "the disk is full: free some space"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "the folder is not writable: fix its permissions or choose another output folder"
    else:
        advice = "check the folder and the disk"
    return FileWriteError(
        err.errno, f"could not write '{path}' ({err.strerror or err}): {advice}, then run again; "
        "the previous version of the file, if any, is unchanged"
    )


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Create `path`'s folder, call write(temporary path), fsync, then move the result onto `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.", suffix=".tmp")
        os.close(handle)
    except OSError as err:
        raise write_error(path, err) from err
    try:
        write(tmp)
        with open(tmp, "rb+") as written:  # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(written.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the mode open(path, "w") would give; mkstemp makes 0600
        os.replace(tmp, path)
        _fsync_folder(folder)  # the rename itself on disk
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(err, OSError) and not isinstance(err, FileWriteError):
            raise write_error(path, err) from err
        disk_error = _disk_error_of(err)
        if disk_error is not None:
            raise write_error(path, disk_error) from err
        raise


# How writers that are not Python file objects report a failed write: torch.save (its C++ stream writer raises
# RuntimeError "[enforce fail at inline_container.cc...] ... unexpected pos" or "file write failed") and safetensors
# (SafetensorError "... I/O error: No space left on device (os error 28)").
_WRITE_FAILURES = ("inline_container.cc", "file write failed", "PytorchStreamWriter failed", "I/O error", "IoError")


def _disk_error_of(err: BaseException) -> OSError | None:
    """The OSError a library's write failure stands for (ENOSPC when it says so, else EIO), or None."""
    text = str(err)
    if isinstance(err, OSError) or not any(marker in text for marker in _WRITE_FAILURES):
        return None
    full = "No space left" in text or "os error 28" in text or "StorageFull" in text or "unexpected pos" in text
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code))


def _fsync_folder(folder: str) -> None:
    """fsync a folder after a rename into it (POSIX: the new entry is durable only then); best effort elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_image_atomic(image, path: str | os.PathLike, format: str = "PNG") -> None:
    """A PIL image, written atomically."""
    write_atomic(path, lambda tmp: image.save(tmp, format=format))


def staging_folder(final: str | os.PathLike) -> Path:
    """Where a folder is written before replace_folder_atomic moves it onto `final`: hidden, next to it, with the
    temporary prefix (so remove_orphaned_temporaries clears what a killed run left)."""
    final = Path(final)
    return final.with_name(TEMP_PREFIX + final.name)


def make_staging_folder(final: str | os.PathLike) -> Path:
    """A new, uniquely named staging folder next to `final` (for move_folder_into_place, when two processes may
    build the same folder at once), with the mode a plain mkdir gives (0777 minus the umask), not mkdtemp's 0700."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{TEMP_PREFIX}{final.name}."))
        os.chmod(folder, 0o777 & ~_umask())
    except OSError as err:
        raise write_error(os.fspath(final), err) from err
    return folder


OLD_SUFFIX = ".old"  # replace_folder_atomic: the previous complete folder, set aside during the swap


def _set_aside_name(final: str) -> str:
    return f"{os.path.join(os.path.dirname(final), TEMP_PREFIX)}{os.path.basename(final)}{OLD_SUFFIX}"


def replace_folder_atomic(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written `staging` folder onto `final` (a checkpoint folder): the old one is renamed
    aside first (".tmp-<name>.old") and removed last. A kill between the two renames leaves no `final`, but the
    set-aside copy, which `recover_interrupted_swaps` (run by remove_orphaned_temporaries) puts back."""
    staging, final = os.fspath(staging), os.fspath(final)
    old = None
    if os.path.exists(final):
        old = _set_aside_name(final)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swaps(folder: str | os.PathLike, recursive: bool = True, stem: str = "") -> list[str]:
    """Put back the complete folders a replace_folder_atomic killed between its two renames set aside: a
    ".tmp-<name>.old" whose <name> does not exist is renamed to <name>. Returns the folders restored.
    (The staging folder of that swap may be complete too, but nothing says so; the set-aside one was.)
    Like remove_orphaned_temporaries, call it only holding the folder's OutputLock; `stem`: only folders named
    `stem...`."""
    restored: list[str] = []
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return restored
    for root, dirs, _ in os.walk(folder):
        for name in list(dirs):
            if name.startswith(TEMP_PREFIX + stem) and name.endswith(OLD_SUFFIX) and len(name) > len(TEMP_PREFIX + OLD_SUFFIX):
                original = os.path.join(root, name[len(TEMP_PREFIX):-len(OLD_SUFFIX)])
                if not os.path.lexists(original):
                    os.replace(os.path.join(root, name), original)
                    restored.append(original)
                    dirs.remove(name)
        if not recursive:
            break
    return restored


def move_folder_into_place(staging: str | os.PathLike, final: str | os.PathLike) -> bool:
    """Move a fully written `staging` folder to `final` unless a folder is already there (a cache that two
    processes may build at once with the same content: the first one wins). Returns False, and leaves
    `staging` for the caller to remove, when `final` already exists; raises FileWriteError otherwise."""
    staging, final = os.fspath(staging), os.fspath(final)
    try:
        os.rename(staging, final)  # onto an empty folder it succeeds; onto a non-empty one it refuses
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(final):
            return False
        raise write_error(final, err) from err
    return True


def remove_orphaned_temporaries(folder: str | os.PathLike, recursive: bool = True, stem: str = "") -> list[str]:
    """Delete the ".tmp-" files and folders a killed writer left in `folder`; returns what was removed.

    stem: only temporaries of files named `stem...` (a shared folder such as models/loras/flash).
    Call it only while holding the folder's OutputLock (no live writer then owns a temporary there).
    """
    removed: list[str] = []
    folder = os.fspath(folder)
    prefix = TEMP_PREFIX + stem
    if not os.path.isdir(folder):
        return removed
    recover_interrupted_swaps(folder, recursive, stem)  # a folder set aside by a killed swap is the last complete copy
    for root, dirs, names in os.walk(folder):
        for name in list(dirs):
            if name.startswith(prefix):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(os.path.join(root, name))
                dirs.remove(name)
        for name in names:
            if name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(root, name))
                removed.append(os.path.join(root, name))
        if not recursive:
            break
    return removed


class OutputLock:
    """An exclusive lock on an output folder for the lifetime of one run.

        with OutputLock(folder, what="flash-distill --config x.yaml"):
            ...  # a second run on the same folder raises OutputLockedError naming this one

    With wait=True a second holder waits instead (a cache that one process builds and another needs: the
    waiter then finds it built); on_wait(holder) is called once before waiting.

    The lock file records pid, host, start time and `what`; the flock itself is released by the kernel
    when the process exits or is killed, so the file may stay without locking anything.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "", wait: bool = False,
                 on_wait: Callable[[str], None] | None = None):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.what, self.wait, self.on_wait = what, wait, on_wait
        self._handle = None

    def holder(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            with open(self.path, encoding="utf-8") as lock_file:
                info = json.loads(lock_file.read() or "{}")
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
            return f"pid {info.get('pid')} on {info.get('host')}, started {started} ({info.get('what') or 'a run'})"
        return "another process"

    def acquire(self) -> OutputLock:
        import fcntl

        try:
            os.makedirs(self.folder, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as err:
            raise write_error(self.path, err) from err
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.wait:
                if self.on_wait is not None:
                    self.on_wait(self.holder())
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # until the holder releases it (or dies)
            else:
                handle.close()
                raise OutputLockedError(
                    f"'{self.folder}' is in use by another training run ({self.holder()}); wait for it to finish, "
                    "stop it, or choose another output"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "what": self.what}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
