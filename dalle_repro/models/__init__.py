"""The networks: the dVAE, the sparse transformer, its attention masks and backends."""
