"""Shared pytest setup. Fixtures live in ``tests/support/*_fixtures.py``; list new ones here.

``tests/`` is on sys.path (rootdir conftest, no ``__init__.py``), so helpers import as
``support.…``.
"""

pytest_plugins = [
    "support.cluster_fixtures",
    "support.operator_fixtures",
    "support.stripe",
    "support.vllm",
    "support.api_fixtures",
]
