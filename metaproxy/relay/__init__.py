"""Accepting redirected connections and relaying their bytes."""
