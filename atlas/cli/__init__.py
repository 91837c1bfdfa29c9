"""The command line: the `atlas` entry point, user commands, and the `atlas chat` / `atlas ask` clients."""
