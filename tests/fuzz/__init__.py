"""Coverage-guided fuzzing harnesses (atheris) for every surface that reads bytes from outside; see targets.py."""
