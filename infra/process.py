"""Child processes that never outlive their parent: the embedded broker, and the services the
demo starts. On Linux a child asks the kernel for SIGTERM when its parent dies, even by SIGKILL
(PR_SET_PDEATHSIG); elsewhere the parent's own clean-up still applies.
"""

from __future__ import annotations

import ctypes
import os
import signal

from infra.settings import Settings

PARENT_ENV = "_DARE_PARENT_PID"  # set by the parent for service processes it starts


def _linux_prctl():  # type: ignore[no-untyped-def]
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _linux_prctl()  # resolved before any fork: a forked child only calls it


def exit_with_parent() -> None:
    """SIGTERM this process when its parent dies. Safe as a `preexec_fn` (only a prctl call)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def die_with_parent() -> None:
    """Called first thing in a service whose parent set PARENT_ENV: exit with that parent, and at
    once if it already died before the prctl took effect."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or _PRCTL is None:
        return
    exit_with_parent()
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of a service this process starts: its settings as DARE_* variables (every
    process sees the same configuration) and this process's id, for `die_with_parent`."""
    env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
    for name, value in settings.model_dump().items():
        if value is not None:
            value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            env[f"DARE_{name.upper()}"] = str(value)
    return env


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds a process (every thread of it) has used so far; this process's without a pid."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
