"""The ``classmeans`` command line: the same operations the HTTP API offers, from a terminal."""
