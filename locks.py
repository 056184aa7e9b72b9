"""File locks that leave nothing behind: an exclusive POSIX record lock on a file that is made to be locked and
removed when released, with the folders made for it, so that a command that takes one and is then refused leaves the
disk as it found it (LockFile), and whether another process holds one (held_elsewhere)."""
import contextlib
import errno
import fcntl
import os

import utils


def missing_folders(directory):
    """The folders of the path directory that do not exist, deepest first (those os.makedirs would make)."""
    missing, directory = [], os.path.abspath(directory)
    while not os.path.exists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    return missing


class LockFile:
    """An exclusive POSIX record lock (lockf) on the file at path, made (with its folders) to be locked and removed when
    released, with the folders it made where they are left empty: a command that is refused leaves nothing. The data
    loader's worker processes do not inherit the lock, so it ends with the process that took it, even on SIGKILL.
    Removing a lock file is safe because a process that locks one checks that it is still the file at path (one
    removed while it waited is locked again under its new file). wait: wait for another holder, else raise
    BlockingIOError."""

    def __init__(self, path, wait):
        self.path = path
        directory = os.path.dirname(path) or '.'
        self.made = missing_folders(directory)
        try:
            os.makedirs(directory, exist_ok=True)
            while not self.locked(path, wait):
                pass
        except BlockingIOError:
            self.remove_made_folders()
            raise
        except OSError as e:
            self.remove_made_folders()
            raise utils.ReirError(f'cannot write the run\'s files in {directory}/ ({e.strerror}): pass a writable '
                                  f'--results_dir') from None
        except BaseException:
            self.remove_made_folders()
            raise

    def locked(self, path, wait):
        """Open and lock the file at path: whether it is still the file there once locked (else it was released and
        removed meanwhile: lock the next one). Raises BlockingIOError where another process holds it."""
        self.file = open(path, 'a')
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            self.file.close()
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise BlockingIOError(e.errno, e.strerror) from None
            raise
        except BaseException:
            self.file.close()
            raise
        if same_file(self.file, path):
            return True
        self.file.close()
        return False

    def release(self):
        with contextlib.suppress(OSError):
            os.remove(self.path)  # while locked: a process that opened it meanwhile finds it gone once it locks it
        self.file.close()
        self.remove_made_folders()

    def remove_made_folders(self):
        for folder in self.made:
            try:
                os.rmdir(folder)
            except OSError:
                return  # not empty: the run wrote there

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()


def same_file(file, path):
    """Whether the open file is the one at path."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(file.fileno())
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def lock_path(path):
    """The lock file of a file that several runs share: .<name>.lock beside it."""
    return os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.lock')


def held_elsewhere(path):
    """Whether another process holds the lock file at path (a run in progress, RunLock). This process must not hold
    it: closing any file of a lock releases the process's lock."""
    try:
        fd = os.open(path, os.O_WRONLY)  # not made where it is gone: its run has ended
    except OSError:
        return False
    with open(fd, 'w') as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            return e.errno in (errno.EACCES, errno.EAGAIN)
    return False
