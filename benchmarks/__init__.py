"""nrrdd benchmarks: scripts that print figures and append CSV rows (run from the repository root as
``python -m benchmarks.<name>``)."""
