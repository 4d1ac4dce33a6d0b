"""What runs leave on disk: adapter dirs (adapter.py) and the output dir of a training run (rundir.py)."""
