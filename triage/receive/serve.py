"""The DICOM receiver alone, without the rest of the daemon: ``python -m triage.receive.scp``.

Why a module of its own: it runs either one :class:`~triage.receive.scp.Receiver` in this process or a
:class:`~triage.receive.workers.WorkerPool` of them (``dicom.workers``), so it sits above both. The
ingest bench and the receive tests start it; ``triage serve`` does the same inside the daemon.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from triage.config import Config, load_or_exit
from triage.ops.logs import configure, get_logger
from triage.receive.scp import Receiver, ReceiverError
from triage.receive.workers import WorkerPool, apply_metric, worker_count
from triage.store.db import Store
from triage.store.rebuild import StateDbError, check_or_raise

log = get_logger("receive")


def serve_receiver(cfg: Config) -> None:
    """Open the store, recover, listen (``dicom.workers`` processes), block until SIGTERM/SIGINT."""
    configure(cfg.settings.logging.level, cfg.settings.logging.format)
    check_or_raise(cfg.storage_root, str(cfg.source) if cfg.source else None)  # as the daemon does
    store = Store(cfg.storage_root)
    try:
        store.recover()  # once, before any worker accepts (it empties tmp/)
        n = worker_count(cfg)
        receiver: Receiver | WorkerPool = (
            Receiver(cfg, store) if n == 1 else WorkerPool(cfg, n, apply_metric)
        )
        stop = threading.Event()

        def _on_signal(signum: int, _frame: Any) -> None:
            log.info("signal", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            if isinstance(receiver, WorkerPool):
                receiver.start()
            else:
                receiver.start(block=False)
        except ReceiverError as exc:
            log.error("receiver_failed", reason=str(exc))
            raise
        while not stop.wait(1.0):
            pass
        receiver.stop()
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triage.receive.scp", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config.toml (default: $GLOWTRIAGE_CONFIG or embedded defaults)")
    args = parser.parse_args(argv)
    cfg = load_or_exit(args.config)
    try:
        serve_receiver(cfg)
    except StateDbError as exc:
        print(f"{args.config or 'config'}: {exc}", file=sys.stderr)
        return 1
    except ReceiverError as exc:
        print(f"{args.config or 'config'}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
