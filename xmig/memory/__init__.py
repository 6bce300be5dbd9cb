"""xmig.memory (see DESIGN.md; filled in by its issue)."""
