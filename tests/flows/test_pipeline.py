"""Inline specs in prefect.yaml: ``prefect deploy`` renders ``{{ … }}`` in deployment parameters
(with Prefect's own templating, as ``prefect deploy`` calls it) and the spec that arrives is
refused in a deployment's flow run; specs that kept their templates, names and paths are not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.utilities.templating import apply_values

from falflow.flows.pipeline import refuse_rendered_spec
from falflow.flows.spec import SPEC_DIR, SpecError, load_pipeline


def _as_deployed(parameters: dict[str, Any]) -> dict[str, Any]:
    """What ``prefect deploy`` stores (prefect/cli/deploy/_core.py: no build step outputs)."""
    rendered: dict[str, Any] = apply_values(
        {"parameters": parameters}, {}, warn_on_notset=True, skip_prefixes=["ctx."]
    )
    return rendered["parameters"]


def test_a_spec_prefect_deploy_emptied_is_refused_in_a_deployment() -> None:
    sample = yaml.safe_load((Path(SPEC_DIR) / "sample.yaml").read_text())
    mangled = _as_deployed({"spec": sample})["spec"]
    assert "for_each" not in mangled["steps"][0]  # Prefect's doing, not falflow's
    with pytest.raises(SpecError, match="prefect deploy"):
        refuse_rendered_spec(mangled, load_pipeline(mangled), deployed=True)
    refuse_rendered_spec(mangled, load_pipeline(mangled), deployed=False)  # a local run decides
    refuse_rendered_spec(sample, load_pipeline(sample), deployed=True)  # templates intact
    refuse_rendered_spec("sample", load_pipeline("sample"), deployed=True)  # by name


def test_a_spec_without_templates_and_one_step_is_not_refused() -> None:
    spec = {
        "name": "one",
        "steps": [
            {"name": "image", "endpoint": "fal-ai/flux/schnell", "arguments": {"prompt": "a"}}
        ],
    }
    assert _as_deployed({"spec": spec})["spec"] == spec
    refuse_rendered_spec(spec, load_pipeline(spec), deployed=True)
