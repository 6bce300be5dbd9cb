"""xmig: live migration of running virtual machines across wide-area links."""

__version__ = "0.1.0"
