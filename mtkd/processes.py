"""Whether a process of this machine exists (standard library only: the Slicer modules use it).

``pid_exists(pid)`` answers for any platform without disturbing the process: on POSIX the
null signal (``os.kill(pid, 0)``), on Windows the process's exit code (``os.kill`` would end it
there). Who checks more (a zombie, a reused pid) builds on it: :mod:`mtkd.folder_lock` compares
the process's start time, ``MTKDLib.run_monitor`` its command line.
"""

from __future__ import annotations

import os
import sys

__all__ = ["pid_exists"]


def pid_exists(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this machine (also another user's)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    except OSError:
        return False
    return True


def _windows_pid_exists(pid: int) -> bool:  # pragma: no cover - Windows only
    """Ask Windows for the process's exit code: STILL_ACTIVE while it runs."""
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    query_limited_information, still_active, access_denied = 0x1000, 259, 5
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:
        return kernel32.GetLastError() == access_denied
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)
