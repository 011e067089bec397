"""Performance benchmarks of the agent against the ceiling and a hand-written baseline (``make bench``).

Results of the latest run and the machine they came from are in BENCHMARKS.md; numbers never go into tests.
"""
