"""Meshes and logical sharding rules, multi-host set-up, and FLOP accounting."""
