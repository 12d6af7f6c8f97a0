"""Benchmarks that print and save numbers: end to end (`shoprec bench`), features, models."""
