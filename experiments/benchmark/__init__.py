"""The E3 benchmark, `python -m experiments.benchmark` (__main__.py: the command and its
flags): which runs with which overrides (plan.py), training them one process each
(runner.py), and report.md with its plots (report.py)."""
