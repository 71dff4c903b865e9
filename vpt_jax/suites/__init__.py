"""Self-contained suites of runs: the offline quickstart and its backbone's pretraining."""
