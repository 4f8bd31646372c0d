"""The report's tables and plots (pure functions; stages/report.py finds the files)."""
