"""The `shoprec` command (``cli/main.py``; one module per area) and the demo."""
