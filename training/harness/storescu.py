"""dcmtk ``storescu`` as the modality (or a PACS) sending studies: one call, or several in parallel.

``TCP_NODELAY=1`` in its environment makes dcmtk disable Nagle on its sockets, as the receiver does on
its own: without it a small PDU can wait for a delayed ACK and the figures measure the kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.harness.process import HarnessError


def dcmtk_env() -> dict[str, str]:
    """This process's environment plus TCP_NODELAY=1 (dcmtk's switch for its sockets)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu_argv(
    port: int,
    files: Sequence[Path],
    *,
    called: str = "GLOWTRIAGE",
    calling: str = "STORESCU",
    host: str = "127.0.0.1",
    flags: Sequence[str] = (),
) -> list[str]:
    exe = shutil.which("storescu")
    if exe is None:
        raise HarnessError("storescu (dcmtk) is not installed: scripts/bootstrap.sh installs it")
    return [exe, "-aet", calling, "-aec", called, *flags, host, str(port), *map(str, files)]


def storescu(
    port: int, files: Sequence[Path], *, timeout: float = 600.0, check: bool = False, **options: Any
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` in one association; with ``check`` a non-zero exit raises :class:`HarnessError`.
    ``options`` are :func:`storescu_argv`'s (``called``, ``calling``, ``host``, ``flags``)."""
    argv = storescu_argv(port, files, **options)
    done = subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise HarnessError(f"storescu failed ({done.returncode}): {(done.stdout + done.stderr)[-1500:]}")
    return done


def storescu_parallel(
    port: int, groups: Sequence[Sequence[Path]], *, called: str, calling: str = "STORESCU"
) -> float:
    """One storescu process per group, all at once; wall seconds from the first start to the last
    exit. Raises :class:`HarnessError` when any of them failed."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_argv(port, g, called=called, calling=calling),
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for g in groups
    ]
    outs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - t0
    for p, out in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise HarnessError(f"storescu exited {p.returncode}: {out.decode(errors='replace')[-1500:]}")
    return seconds
