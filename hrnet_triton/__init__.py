"""hrnet-triton: serve PaddleClas HRNet image classifiers on NVIDIA Triton Inference Server.

This package holds what every stage shares: the table of seed variants, the exception
family, atomic file writes and the ``hrnet-triton`` command line. The pipeline stages live
in ``hrnet_build`` (folder ``build/``) and the client in ``hrnet_client`` (folder ``client/``).
"""

__version__ = "0.1.0"
