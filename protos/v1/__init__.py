"""Generated stubs for ``loraplex.v1``; regenerate with ``python -m loraplex.tools.gen_protos``."""
