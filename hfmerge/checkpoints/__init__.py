"""Checkpoint I/O: references, readers (local folders), the streaming writer, tied aliases.

Nothing here knows about merge methods.
"""
