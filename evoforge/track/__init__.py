"""Tracking: W&B logging (`wandb_log.WandbTracker`) and the run report (`report.write_report`).

Nothing is imported here, so `evoforge report` never pays for importing wandb (about 1 s).
"""
