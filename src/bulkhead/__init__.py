"""Bulkhead: security by compartmentalization, Qubes OS's design on a stock Linux host.

Every activity lives in its own QEMU virtual machine (a *qube*); the daemon in
the role of Qubes' qubesd (``bulkhead daemon``) keeps their definitions and is
the only door to them, through Qubes' own Admin API.
"""

__version__ = "0.1.0"
