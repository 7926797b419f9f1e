"""Mikrom: Kubernetes-native microVMs.

This package is the small contract shared by the operator (`mikrom.operator`) and the node worker
(`mikrom.worker`): the API models, task and queue names, settings and the Celery app
(`mikrom.celery_app`). The operator and the worker never import each other.
"""

import os as _os

__version__ = "0.1.0"

# In a source checkout the operator and worker live beside this package, in the repository's
# top-level operator/ and worker/ folders; an installed wheel carries them inside it instead.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.isdir(_os.path.join(_root, d)) for d in ("operator", "worker")):
    __path__.append(_root)  # noqa: F821 - a package's __path__ is set by the import system
