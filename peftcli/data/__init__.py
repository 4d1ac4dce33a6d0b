"""Training data: sources, rendering to text and target spans, tokenizing, the cache, batches."""
