"""`kubectl kustomize` of deploy/kubernetes in Python, for machines without kubectl (CI installs none).

It knows only the fields that base uses and refuses any other, so that the two cannot part quietly;
tests/test_kubernetes.py compares it with kubectl's rendering wherever kubectl is installed.
"""

import base64
from pathlib import Path

import yaml

KNOWN_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "secretGenerator"}
CLUSTER_WIDE = {"Namespace"}  # the kinds of the base that belong to no namespace


class Unsupported(ValueError):
    """A kustomization field or option this renderer does not know."""


def render(folder: Path) -> list:
    """The objects `kubectl kustomize folder` prints, as dicts."""
    folder = Path(folder)
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_FIELDS
    if unknown:
        raise Unsupported(f"kustomization fields {sorted(unknown)}")
    objects = [document for resource in kustomization.get("resources", [])
               for document in yaml.safe_load_all((folder / resource).read_text()) if document]
    objects += [_secret(folder, generator) for generator in kustomization.get("secretGenerator", [])]
    for kept in objects:
        metadata = kept["metadata"]
        if "namespace" in kustomization and kept["kind"] not in CLUSTER_WIDE:
            metadata["namespace"] = kustomization["namespace"]
        for label in kustomization.get("labels", []):
            if set(label) - {"pairs"}:  # includeSelectors, includeTemplates: labels beyond the objects' own
                raise Unsupported(f"labels options {sorted(set(label) - {'pairs'})}")
            metadata["labels"] = {**metadata.get("labels", {}), **label["pairs"]}
    return objects


def _secret(folder: Path, generator: dict) -> dict:
    """An Opaque Secret of files, each `key=path` or `path` (the key then its file name)."""
    if set(generator) - {"name", "files", "options"} or generator.get("options") != {"disableNameSuffixHash": True}:
        raise Unsupported(f"secretGenerator {generator}")
    data = {}
    for entry in generator["files"]:
        key, _, path = entry.rpartition("=")
        data[key or Path(path).name] = base64.b64encode((folder / path).read_bytes()).decode()
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]}, "type": "Opaque",
            "data": data}
