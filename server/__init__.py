"""The HTTP gateway: OpenAI-compatible API in front of a PAD worker process.
Knows nothing about tensors; the engine runs in pad_core.worker."""
