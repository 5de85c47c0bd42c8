"""egress-agent: which processes on this host talk to the internet, and where to."""

__version__ = "0.2.0"
