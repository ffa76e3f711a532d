"""Drop-ins for the trainers people use: the Hugging Face Trainer and sentence-transformers' losses.

Imported lazily (``fastrank.integrations.trainer``, ``fastrank.integrations.sentence_transformers``) so that
``import fastrank`` needs neither sentence-transformers nor the Trainer's extras.
"""
