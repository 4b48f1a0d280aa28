"""Client-side tools that talk to any OpenAI-compatible endpoint over HTTP:
`pad eval` (preference following) and `pad bench` (load and latency)."""
