"""Orchestration: set-up, the stage loop, the stages, checkpoints, metrics, config checks, eval."""
