"""Stage 0, data: reading and writing webdataset shards, captions and images, the BPE tokenizer, pre-
encoding images to dVAE tokens, and the synthetic data sets.
"""
