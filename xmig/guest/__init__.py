"""xmig.guest (see DESIGN.md; filled in by its issue)."""
