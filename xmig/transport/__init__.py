"""Framed, authenticated, multi-stream transport between two agents."""
