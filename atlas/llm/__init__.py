"""The LLM side: the provider client and its HTTP transport, the dev provider, agent definitions."""
