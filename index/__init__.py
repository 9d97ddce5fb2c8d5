"""Choosing which past tokens a decode query attends to (retrievers and ANN indexes).

faiss and hnswlib are imported only when an index of theirs is built.
"""

from .ann import exact_topk, recall_at_k
from .attention_graph import AttentionAwareIndex
from .faiss_ann import FaissHNSWIndex, FaissIVFIndex
from .hnswlib_ann import HnswlibIndex
from .quest import QuestRetriever
from .retriever import LowRankRetriever, Retriever, group_scores

__all__ = ["AttentionAwareIndex", "FaissHNSWIndex", "FaissIVFIndex", "HnswlibIndex",
           "LowRankRetriever", "QuestRetriever", "Retriever", "exact_topk", "group_scores",
           "recall_at_k"]
