"""Thin wrappers over Linux socket interfaces that the relay needs."""
