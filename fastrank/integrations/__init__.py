"""Drop-ins for the tools people use: the Hugging Face Trainer, sentence-transformers' losses, and Ray Data.

Imported lazily (``fastrank.integrations.trainer``, ``fastrank.integrations.sentence_transformers``,
``fastrank.integrations.ray``) so that ``import fastrank`` needs neither sentence-transformers, the Trainer's
extras nor Ray.
"""
