"""ztai — Zero Trust AI: a verifying checkpoint in front of everything AI does."""

__version__ = "0.1.0"
