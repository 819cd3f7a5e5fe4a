"""Hydra callback ``QuietSweeps``: no plugin set-up chatter before a sweep's first job."""
