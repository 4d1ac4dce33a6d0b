"""`peft train`: the loop (loop.py) and its output dir (run.py); the step schedule, the plain losses and
the resume state beside them."""
