"""Every test under tests/gpu/ carries the ``gpu`` marker (``-m gpu`` selects them, ``-m "not gpu"``
leaves them out); each file skips itself without the GPUs it needs."""

import pathlib

import pytest

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in pathlib.Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)
