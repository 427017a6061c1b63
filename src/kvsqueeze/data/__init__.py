"""Text the tasks and the demo are built from."""
