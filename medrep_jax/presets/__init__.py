"""Config builders shared by the thin files in `configs/` (which parse variant args)."""
