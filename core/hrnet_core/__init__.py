"""The bottom layer of hrnet-triton: what every stage and entry point shares.

The seed variants, the serving contract (tensor names and PaddleClas's preprocessing, with its
round trip through Triton config ``parameters``), the preprocessing itself, labels and top-k,
sample photographs, the runtime interface and its parity comparison, manifests, atomic writes,
the pinned release and the exception family. It imports nothing else of this project.
"""

__version__ = "0.1.0"
