"""Tests of the HTTP layer (in process over ASGI, and one real `classmeans serve`)."""
