"""The data path: UFX → messages → token ids + tiles, shards, sampler, collate."""
