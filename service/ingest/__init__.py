"""Untrusted input: images, archives and dataset files, turned into checked in-memory arrays."""
