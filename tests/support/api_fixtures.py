"""Fixtures for tests of ``gpupool api`` (helpers in :mod:`support.api`).

- ``stack``: the REST API (a ``gpupool api`` process whose ServiceAccount holds exactly the chart's
  API rules in the namespace) in front of the shared operator (billing off), in the test's fresh
  namespace; ``stack.caller("cus_x")`` makes a management key and a client for that customer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpupool.devcluster import LocalCluster
from support.api import Stack, start_stack
from support.objects import Objects


@pytest.fixture
def stack(cluster: LocalCluster, kube: Any, objs: Objects, namespace: str, tmp_path: Path,
          request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The API in front of the shared operator (billing off), in a fresh namespace."""
    s = start_stack(cluster, kube, namespace, tmp_path,
                    re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[5:40])
    try:
        yield s
    finally:
        s.api.stop()
