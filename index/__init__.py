"""Choosing which past tokens a decode query attends to (retrievers and ANN indexes)."""

from .retriever import LowRankRetriever, QuestRetriever, Retriever, group_scores

__all__ = ["LowRankRetriever", "QuestRetriever", "Retriever", "group_scores"]
