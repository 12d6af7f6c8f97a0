"""Offline tools an operator runs beside the live path: replay, replay diff, rebuild-state,
ranges, inspect, dead-letter tools, the dataset producer and `recs tail`."""
