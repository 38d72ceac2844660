"""One test/demo/bench harness: the real peers glowtriage talks to, started the same way everywhere.

The integration tests (``tests/integration/conftest.py``), the demo (``python -m training.demo``) and the
benches (``bench/``) all drive real programs over loopback: Orthanc as the PACS, an MLLP listener as the
RIS, ``triage serve`` as a subprocess, dcmtk ``storescu`` as the modality. Each used to carry its own copy
of those wrappers with its own readiness check and timeouts; they live here once, so a fix to how Orthanc
is started (or how a daemon is known to be ready) reaches every caller.

Modules: :mod:`.ports` (free ports, waiting for a listener), :mod:`.process` (logged child processes,
stopping them, waiting for a condition), :mod:`.orthanc`, :mod:`.mllp`, :mod:`.daemon`, :mod:`.storescu`,
:mod:`.config` (writing TOML configs), :mod:`.series` (small synthetic CT series for the plumbing tests),
:mod:`.powercut` (a FUSE filesystem that keeps what a power cut would leave; its rules in
:mod:`.powercut_model`, its server in :mod:`.powercut_fs`), :mod:`.sender` (which instances were
acknowledged, for crash tests).
"""

from training.harness.process import HarnessError

__all__ = ["HarnessError"]
