"""Tests of the online serving layer (service/serving) without HTTP."""
