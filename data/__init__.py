"""Embedded default data: the toy arithmetic world."""
