"""Opening connections through upstream proxies."""
