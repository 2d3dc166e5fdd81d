"""Using a trained run: profiles and rankings for one user at a time (CLI, web page, judge)."""
