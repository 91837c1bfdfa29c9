"""Atlas: a self-hosted gateway between people and AI agents."""

__version__ = "0.1.0"
