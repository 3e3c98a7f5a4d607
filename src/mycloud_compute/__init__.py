"""mycloud Compute: the service behind the Compute API."""

__version__ = "0.1.0"
