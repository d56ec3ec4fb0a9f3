"""``retnet-distill serve``: an OpenAI-compatible HTTP server for a student, with continuous batching."""
