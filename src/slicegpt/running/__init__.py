"""Drivers that run the method over a whole model: in memory, streamed from shards, across ranks."""
