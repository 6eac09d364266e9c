"""Files in and out: calibration text, safetensors shards, sliced checkpoints, model cards, model resolution."""
