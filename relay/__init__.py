"""The SMTP submission relay: listeners, session policy, spool and delivery."""

__version__ = "0.1.0"
