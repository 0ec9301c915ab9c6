"""Foundations every stage uses: the typed config and CLI, atomic file writes, distributed set-up, CPU
facts, precision picking, fault injection, image files.
"""
