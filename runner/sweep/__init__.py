"""Sweeps and their reports: the per-job ``result.json`` (result.py), the summary of a multirun's results
(report.py, table.py, markdown.py, plots.py) and the Hydra callback that writes it when a multirun ends
(callback.py). The sweep presets themselves are config: ``conf/sweep/``."""
