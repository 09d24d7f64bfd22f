"""The model layer: loading (the embedded default, Hugging Face folders and ids, TransformerLens
names) behind one adapter, hook-name translation, replaying the tail of a model from a cached
residual, the head's logits within a memory budget, several processes, and timing."""
