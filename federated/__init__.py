"""Placeholder package; see the open issue for this mode."""
