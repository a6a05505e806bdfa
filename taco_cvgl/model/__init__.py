"""The embedder network: ModelConfig, backbones, pooling and head, one preprocessing."""
