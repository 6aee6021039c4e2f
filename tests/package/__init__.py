"""Helpers of the package test: a cached Debian 12 root and a booted container."""
