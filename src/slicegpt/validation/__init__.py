"""Checks that run before any model is loaded: options, output locations, the model's config.

Each subcommand has one validation step (commands/validate.py) built from these, so a
bad value is refused in one `slicegpt: error:` line that names the option the user set,
before minutes of loading, calibration or training are spent.
"""
