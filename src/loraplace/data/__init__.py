"""Rows in, tokenized examples and batches out."""
