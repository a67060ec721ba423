"""Answering studies: a hospital export read as studies and series, a model as one call from HU, the answer and its files."""
