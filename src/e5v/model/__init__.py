"""The backend: loading a LLaVA-NeXT checkpoint, the runner (forward plus last-token
pooling), the official reference recipe and the model's own vocabulary."""
