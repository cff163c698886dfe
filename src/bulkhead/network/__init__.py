"""Networking between qubes: addresses, the links (a VLAN relay per netvm), sys-net's
uplink, and what dom0 tells each qube's agent (see :mod:`.manager`)."""
