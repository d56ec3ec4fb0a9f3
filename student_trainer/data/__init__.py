"""Data: download, preprocessing with assistant masks, memory-mapped shards, the embedded corpus."""
