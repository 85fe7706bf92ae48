"""Sampling G outputs per prompt and turning them into a scored, advantaged batch."""
