"""Stage 1: model loading, token stream, residual capture, similarity probe, partition, shards."""
