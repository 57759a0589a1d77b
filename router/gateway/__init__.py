"""The REST gateway: OpenAI- and TGI-shaped HTTP in front of the router's gRPC API."""
