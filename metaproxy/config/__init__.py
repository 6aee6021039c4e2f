"""Configuration: the only package that knows about ConfigObj and JSON."""

from metaproxy.config.loader import load, replace_port
from metaproxy.config.model import Config

__all__ = ["Config", "load", "replace_port"]
