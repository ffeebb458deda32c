"""Replay buffer of the base model's original text (FAISS index, selection strategies).

Knows nothing of the daemon: it is given text and settings and returns passages.
"""
