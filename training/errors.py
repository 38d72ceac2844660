"""The one exception of the training side that both data sources and the loop raise.

It lives below both :mod:`training.data` and :mod:`training.train` so neither has to import the other
to share it (the data sources used to import it from the training loop, which imported them back).
"""

from __future__ import annotations


class TrainingError(Exception):
    """Training cannot start or go on: bad data or arguments, a checkpoint of another run, or a loss
    that stays non-finite. The message names what and where. ``training train`` prints it as one line."""
