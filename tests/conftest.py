"""Shared fixtures: real mosquitto brokers, swtpm, and agents started as threads or subprocesses."""

pytest_plugins = [
    "tests.fixtures.brokers",
    "tests.fixtures.swtpm",
    "tests.fixtures.agents",
    "tests.fixtures.hostile_broker",
    "tests.fixtures.disks",
    "tests.fixtures.ingest",
]
