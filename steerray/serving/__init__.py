"""Serving: the reward model (``reward_app``) and shared HTTP helpers (``http``) for steerray's services."""
