"""Reliability scenarios: each starts a real ``classmeans serve`` (or the fault-injecting harness around it)
on 127.0.0.1, drives it, and returns a :class:`~bench.rel.common.ScenarioResult` with named checks and the
figures measured. ``python -m bench.reliability`` runs them at full size; ``tests/reliability`` at CI size."""
