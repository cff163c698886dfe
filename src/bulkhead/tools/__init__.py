"""The qvm-* tools, with Qubes' names, flags and output.

Each module has ``main(args=None, app=None) -> int``: ``args`` overrides the
command line, ``app`` an :class:`bulkhead.client.App` to use instead of one
connected to ``$BULKHEAD_SOCKET`` (tests inject one with a fake transport).
Everything they share lives in :mod:`bulkhead.client.toolparser`.
"""
