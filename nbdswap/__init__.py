"""nbdswap: an NBD server for Linux swap with compressed-RAM, disk and remote tiers."""

__version__ = "0.1.0"
