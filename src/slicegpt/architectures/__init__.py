"""What slicegpt knows about model families, as data, and the sliced modeling code that checkpoints carry."""
