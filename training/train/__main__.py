"""``python -m training.train`` (and ``torchrun -m training.train``): the ``training train`` command."""

from training.train.loop import main

if __name__ == "__main__":
    raise SystemExit(main())
