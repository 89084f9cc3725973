"""`make bench`: workbench's overheads and accuracy, each measured beside its floor in one run.

Run `python bench/run.py --help`. Results go to reports/bench/bench.json and bench.md.
"""
