"""Config files: `get_config(arg)` for --config=configs/<name>.py[:arg]; derived ones import `default` as a module."""
