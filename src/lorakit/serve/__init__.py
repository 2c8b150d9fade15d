"""Serving: the batched multi-adapter engine, slot cache, compressed collections and HTTP server."""
