"""The ``loraplex`` command line and its helpers: mesh launcher, model store, benchmarks."""
