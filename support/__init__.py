"""Generic helpers shared by every package: structured logs, subprocesses, errors, paths.

Imports nothing of the product, so `fsm/` may use it too.
"""
