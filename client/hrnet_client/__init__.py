"""The Python client: PaddleClas-exact preprocessing and top-k classification."""
