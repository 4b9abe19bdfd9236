"""The OpenAI-compatible server: continuous-batching engine, exact prefix cache, HTTP front end."""
