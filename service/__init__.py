"""classmeans-serve: serving image classifiers with training-free early exit (E2CM class means)."""

__version__ = "0.1.0"
