"""``python -m training.demo``."""

from training.demo.cli import main

raise SystemExit(main())
