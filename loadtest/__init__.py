"""The Locust load test, shipped as package data so that ``hrnet-triton bench`` finds it in an
installed wheel: run it as ``locust -f loadtest/hrnet.py`` (or the installed copy's path)."""
