"""The main job end to end: pre-flight, resume, convert (stages in order, see convert.py)."""
