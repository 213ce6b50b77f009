"""Engines: one object per backend that scores and generates (see base.py)."""
