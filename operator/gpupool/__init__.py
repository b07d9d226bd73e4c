"""gpupool: sell seats on shared GPU model pools by UTC time block."""

GROUP = "gpupool.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

__version__ = "0.1.0"
