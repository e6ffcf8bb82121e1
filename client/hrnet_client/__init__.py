"""The Python client: classify images through a Triton server (HTTP or gRPC), or in-process.

``served_model`` reads what a client needs from the server (address, contract, max batch,
labels); ``triton`` sends requests (concurrent lanes, shared memory, server-side top-k);
``classify`` turns files into top-k predictions over any runtime. Preprocessing is the core's
(``hrnet_core.preprocess``), the same module the build's parity gates use.
"""
