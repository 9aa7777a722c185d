"""Studies: a run folder's records (runs.py), the Study that fills it (study.py), and what is computed from its
records (metrics.py, stats.py, report.py)."""
