"""Plumbing both sides use and neither owns: reading config files, supervising Flower's processes."""
