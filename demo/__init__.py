"""``pfi demo``: the main job — a personalized federation on a real foundation model, end to end."""
