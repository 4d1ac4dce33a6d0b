"""`peft compare`: every method on the user's own data and budget, one table.

plan.py turns the recipe and the `--method` flags into rows (each an ordinary recipe, checked) and lists the
methods that do not apply; run.py trains the rows one after another, each a `peft train` run directory of its
own under the recipe's output_dir; table.py writes compare.json and compare.md from the rows' own report.json
files, plots.py the eval curves and the cost-against-result plot.
"""
