"""Text in, token ids out: reading corpora, tokenizers, the on-disk token store, the corpus registry."""
