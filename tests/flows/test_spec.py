"""Spec validation and templates: every problem is refused with the step and field named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from falflow.flows.spec import (
    Context,
    RenderError,
    SpecError,
    load_pipeline,
    render,
    shipped_specs,
)
from falflow.flows.spec.templates import compile_value
from falflow.tasks.paths import format_path, get_path, parse_path


def _spec(*steps: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {"name": "t", "params": params, "steps": list(steps)}


def _problems(source: Any, parameters: dict[str, Any] | None = None) -> str:
    with pytest.raises(SpecError) as caught:
        load_pipeline(source).bind(parameters)
    return "\n".join(caught.value.problems)


IMAGE = {
    "name": "image",
    "endpoint": "fal-ai/flux/schnell",
    "for_each": "{{ params.prompts }}",
    "arguments": {"prompt": "{{ item }}"},
}
PROMPTS = {"type": "list", "default": ["a", "b"]}


def test_paths_round_trip_and_explain_misses() -> None:
    assert parse_path("images[0].url") == ("images", 0, "url")
    assert parse_path('a["odd key"][-1]') == ("a", "odd key", -1)
    assert format_path(("a", "odd key", 0, "b")) == 'a["odd key"][0].b'
    with pytest.raises(ValueError, match="bad path"):
        parse_path("images[0]url")
    value = {"images": [{"url": "u"}]}
    assert get_path(value, ("images", 0, "url")) == "u"
    with pytest.raises(LookupError, match=r"images\[0\] has no key 'uri' \(keys: url\)"):
        get_path(value, ("images", 0, "uri"))
    with pytest.raises(LookupError, match="has 1 items: no \\[3\\]"):
        get_path(value, ("images", 3))


def test_whole_templates_keep_json_type_and_text_templates_render_text() -> None:
    ctx = Context(
        {"n": 3, "tags": ["x", "y"]}, {"image": {"images": [{"url": "https://u"}]}}, "it", 2
    )
    tree = compile_value(
        {
            "count": "{{ params.n }}",
            "tags": " {{ params.tags }} ",
            "url": "{{ steps.image.images[0].url }}",
            "text": "#{{ index }} {{ item }} {{ params.tags }}",
            "nested": [{"deep": "{{item}}"}, 5, None],
        }
    )
    assert render(tree, ctx, "arguments") == {
        "count": 3,
        "tags": ["x", "y"],
        "url": "https://u",
        "text": '#2 it ["x", "y"]',
        "nested": [{"deep": "it"}, 5, None],
    }
    with pytest.raises(RenderError, match=r"field 'arguments.url': \{\{ steps.image.images\[1\]"):
        render(compile_value({"url": "{{ steps.image.images[1].url }}"}), ctx, "arguments")


def test_the_shipped_sample_is_valid_and_chains_item_by_item() -> None:
    assert "sample" in shipped_specs()
    pipeline = load_pipeline("sample")
    chains = {step.name: step.chain for step in pipeline.steps}
    assert chains == {"image": None, "upscale": "image", "video": "upscale"}
    assert pipeline.bind({"prompts": ["one"]})["prompts"] == ["one"]


def test_steps_may_be_written_in_any_order() -> None:
    later = {
        "name": "up",
        "endpoint": "fal-ai/esrgan",
        "arguments": {"image_url": "{{ steps.image[0].images[0].url }}"},
    }
    pipeline = load_pipeline(_spec(later, IMAGE, prompts=PROMPTS))
    assert [s.name for s in pipeline.steps] == ["image", "up"]
    assert pipeline.steps[1].needs == {"image"}


def test_inline_yaml_json_and_files_load(tmp_path: Path) -> None:
    spec = _spec(IMAGE, prompts=PROMPTS)
    assert load_pipeline(json.dumps(spec)).spec.name == "t"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(spec))
    assert load_pipeline(str(path)).spec.steps[0].name == "image"
    assert "no shipped spec of that name (shipped: sample" in _problems("nope")
    assert "cannot parse at line 3" in _problems("steps:\n  - [unclosed\n")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"endpoint": "flux"},
            "step 'image' (steps[0]), field 'endpoint': must be a fal endpoint id",
        ),
        (
            {"arguments": ["x"]},
            "step 'image' (steps[0]), field 'arguments': Input should be a valid dictionary",
        ),
        ({"promt": "x"}, "step 'image' (steps[0]), field 'promt': unknown field"),
        (
            {"retention": {"media_ttl_seconds": 5}},
            "field 'retention.media_ttl_seconds': must be at least 60",
        ),
        (
            {"retention": {"store_io": "maybe"}},
            "field 'retention.store_io': Input should be a valid boolean",
        ),
    ],
)
def test_type_errors_and_unknown_fields_name_step_and_field(
    change: dict[str, Any], expected: str
) -> None:
    assert expected in _problems(_spec({**IMAGE, **change}, prompts=PROMPTS))


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            {"arguments": {"prompt": "{{ params.promts }}"}},
            "step 'image', field 'arguments': unknown parameter in {{ params.promts }} (parameters: prompts",
        ),
        (
            {"arguments": {"x": "{{ steps.nope.url }}"}},
            "step 'image', field 'arguments': unknown step in {{ steps.nope.url }} (steps: image)",
        ),
        ({"arguments": {"x": "{{ steps.image }}"}}, "refers to the step itself"),
        (
            {"for_each": None, "arguments": {"prompt": "{{ item }}"}},
            "{{ item }} is only defined in a step with for_each",
        ),
        (
            {"for_each": "prompts"},
            "field 'for_each': must be a list, or one template naming a list",
        ),
        ({"for_each": "{{ item }}"}, "field 'for_each': must be a list"),
        ({"arguments": {"prompt": "{{ item "}}, "field 'arguments.prompt': unbalanced braces"),
        (
            {"arguments": {"prompt": "{{ foo.bar }}"}},
            "a template starts with params., steps., item or index",
        ),
    ],
)
def test_bad_references_are_refused(step: dict[str, Any], expected: str) -> None:
    assert expected in _problems(_spec({**IMAGE, **step}, prompts=PROMPTS))


def test_fan_out_shapes_are_checked() -> None:
    single = {"name": "one", "endpoint": "fal-ai/flux/dev", "arguments": {"prompt": "p"}}
    over_single = {
        "name": "up",
        "endpoint": "fal-ai/esrgan",
        "for_each": "{{ steps.one }}",
        "arguments": {},
    }
    assert "makes one output (an object), not a list; name a list inside it" in _problems(
        _spec(single, over_single)
    )
    field_of_fan = {
        "name": "up",
        "endpoint": "fal-ai/esrgan",
        "arguments": {"u": "{{ steps.image.images }}"},
    }
    assert "step 'image' fans out, so steps.image is the list of its outputs" in _problems(
        _spec(IMAGE, field_of_fan, prompts=PROMPTS)
    )
    over_list_in_single = {
        **over_single,
        "for_each": "{{ steps.one.images }}",
        "arguments": {"image_url": "{{ item.url }}"},
    }
    assert load_pipeline(_spec(single, over_list_in_single)).steps[1].needs == {"one"}


def test_cycles_name_the_steps_and_fields() -> None:
    a = {"name": "a", "endpoint": "x/y", "arguments": {"u": "{{ steps.b.url }}"}}
    b = {"name": "b", "endpoint": "x/y", "arguments": {"u": "{{ steps.a.url }}"}}
    assert (
        "steps form a cycle a → b → a (step 'a' field 'arguments' needs 'b', step 'b' field 'arguments' needs 'a')"
        in _problems(_spec(a, b))
    )


def test_duplicate_names_and_empty_pipelines_are_refused() -> None:
    assert "two steps are called 'image'" in _problems(_spec(IMAGE, IMAGE, prompts=PROMPTS))
    assert "field 'steps': List should have at least 1 item" in _problems({"steps": []})
    assert "field 'steps': Field required" in _problems({"name": "x"})
    assert "field 'stpes': unknown field" in _problems({"stpes": []})


def test_parameters_are_checked_before_anything_runs() -> None:
    spec = _spec(IMAGE, prompts={"type": "list"}, seed={"type": "integer", "default": 1})
    assert "parameter 'prompts': required (a list) but not given" in _problems(spec)
    assert (
        "parameter 'extra': not declared by this pipeline (parameters: prompts, seed)"
        in _problems(spec, {"prompts": [], "extra": 1})
    )
    assert "parameter 'seed': Input should be a valid integer" in _problems(
        spec, {"prompts": [], "seed": "x"}
    )
    assert load_pipeline(spec).bind({"prompts": ["p"], "seed": "7"})["seed"] == 7
    anything = _spec(IMAGE, prompts={"default": "not a list"})
    assert "step 'image', field 'for_each': {{ params.prompts }} is a str" in _problems(anything)
    objects = _spec({**IMAGE, "arguments": {"prompt": "{{ item.text }}"}}, prompts=PROMPTS)
    assert (
        "step 'image', field 'arguments.prompt': {{ item.text }}: the value is a string, not an object"
        in _problems(objects)
    )


def test_a_literal_for_each_list_may_hold_templates() -> None:
    step = {**IMAGE, "for_each": ["{{ params.prompts[0] }}", "fixed"]}
    pipeline = load_pipeline(_spec(step, prompts=PROMPTS))
    params = pipeline.bind({"prompts": ["first"]})
    items = render(pipeline.steps[0].for_each, Context(params, {}), "for_each")
    assert items == ["first", "fixed"]
    bad = {**IMAGE, "for_each": ["{{ item }}"]}
    assert "{{ item }} cannot be used in for_each itself" in _problems(_spec(bad, prompts=PROMPTS))
