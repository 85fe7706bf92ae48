"""The embedded task, math datasets, prompt templates, the tokenizer, and batches."""
