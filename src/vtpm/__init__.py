"""vtpm: virtual TPMs for Linux guests whose secrets are rooted in the host's hardware TPM."""

__version__ = "0.1.0"
