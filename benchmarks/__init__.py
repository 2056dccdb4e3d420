"""Documented measurements (scripts run by hand; their figures are in docs/results.md)."""
