"""The production overlay rendered with an optional component added, as an operator
would add it to their own overlay."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT


def render_prod_with(component: Path, folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of k8s/overlays/prod with `component`, from a kustomization
    written in `folder`."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on this machine: the manifests are rendered with it")
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(ROOT / "k8s/overlays/prod", folder)],
                "components": [os.path.relpath(component, folder)],
            }
        )
    )
    done = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]
