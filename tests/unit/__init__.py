"""Unit tests: one module of Atlas at a time, with fakes for what it uses, on the autojump clock."""
