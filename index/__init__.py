"""Choosing which past tokens a decode query attends to (retrievers and ANN indexes)."""
