"""hrnet-triton's entry points: the ``hrnet-triton`` command line, the demo, the local server and bench.

The top layer. It calls the build stages (``hrnet_build``, folder ``build/``) and the client
(``hrnet_client``, folder ``client/``), which share only the core (``hrnet_core``, folder
``core/``). See docs/architecture.md.
"""

from hrnet_core import __version__

__all__ = ["__version__"]
