"""What the stages share: params, file IO, the model and its files, numerics, compute counts, the CLI frame."""
