"""Run directories and what a finished run becomes: its files (rundir), its calibrated bundle and reports (finish)."""
