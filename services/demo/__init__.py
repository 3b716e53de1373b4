"""``pfi demo``: the main job (for now an end-to-end smoke of the federation pipeline)."""
