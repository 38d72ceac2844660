"""send: destinations (C-STORE, MLLP, STOW-RS, ...) the durable outbox delivers to, with retries.

Importing the package imports every module in it, so each destination kind's ``@register`` has run
before anything looks a kind up: a new kind is a new module here (plus its config section), with no
list to extend. See :mod:`triage.send.base`.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
