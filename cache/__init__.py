"""The activation store: Zarr layout, manifest of completed shards, shard reader."""
