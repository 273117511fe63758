"""Synthesis methods: pure PyTorch, no Ray, no file system (DESIGN principle 2)."""
