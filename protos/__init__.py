"""The gRPC contract (package ``loraplex.v1``) and the server plumbing every component shares."""
