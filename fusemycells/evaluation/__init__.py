"""Scoring predictions: the challenge metric (metrics) and quality-control figures (qc)."""
