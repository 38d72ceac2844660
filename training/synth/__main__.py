"""``python -m training.synth``: the same as ``training synth`` (see :mod:`training.synth.dataset`)."""

from training.synth.dataset import main

raise SystemExit(main())
