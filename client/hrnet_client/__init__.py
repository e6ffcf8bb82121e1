"""The Python client: classify images through a Triton server (HTTP or gRPC), or in-process.

``served_model`` reads what a client needs from the server (address, contract, max batch,
labels) and chooses the served model for an input; ``inputs`` makes each input (the
preprocessed tensor, the uint8 crop, or the file's bytes); ``triton`` sends requests on
concurrent lanes (``lane``: retries; ``shared_memory``; server-side top-k); ``classify`` turns files
into top-k predictions over any runtime. Preprocessing is the core's (``hrnet_core.preprocess``),
the same module the build's parity gates and the server's ``hrnet_preprocess`` use.
"""
