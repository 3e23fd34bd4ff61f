"""Tracing a test example back to the training pairs that made the model get it wrong
(relative-IS)."""
