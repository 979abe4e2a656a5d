"""Finding output files, the allowed-host check, and derived bucket keys (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest

from falflow.tasks.outputs import (
    OutputFile,
    OutputRefused,
    check_file_name,
    check_source,
    describe_url,
    find_files,
    object_key,
    rewrite_urls,
)

CDN = ("fal.media", "*.fal.media", "127.0.0.1:8443")

FLUX_OUTPUT: dict[str, Any] = {
    "images": [
        {
            "url": "https://v3.fal.media/files/rabbit/a1.png",
            "width": 1024,
            "height": 768,
            "content_type": "image/png",
        },
        {"url": "https://v3b.fal.media/files/b/koala/b2.png", "content_type": "image/png"},
    ],
    "seed": 42,
    "prompt": "a lighthouse, https in the prompt is not a URL",
    "timings": {"inference": 0.4},
}


def test_finds_file_objects_and_bare_urls_at_any_depth_once_each() -> None:
    output = {
        **FLUX_OUTPUT,
        "extra": {"deep": [["https://fal.media/files/old.mp4"]]},
        "again": "https://v3.fal.media/files/rabbit/a1.png",
        "video": {"url": "https://v3.fal.media/files/v.mp4", "file_name": "v.mp4", "file_size": 9},
    }
    files = find_files(output)
    assert [f.url for f in files] == [
        "https://v3.fal.media/files/rabbit/a1.png",
        "https://v3b.fal.media/files/b/koala/b2.png",
        "https://fal.media/files/old.mp4",
        "https://v3.fal.media/files/v.mp4",
    ]
    assert files[0].content_type == "image/png"
    assert files[3] == OutputFile("https://v3.fal.media/files/v.mp4", "v.mp4", None, 9)


def test_untrusted_metadata_of_the_wrong_type_is_ignored() -> None:
    (file,) = find_files(
        {"f": {"url": "https://v3.fal.media/x", "file_name": 3, "file_size": True}}
    )
    assert file.file_name is None
    assert file.file_size is None


@pytest.mark.parametrize(
    "url",
    [
        "https://v3.fal.media/files/a.png",
        "https://fal.media/files/a.png",
        "https://V3B.FAL.MEDIA:443/files/b/x/a.png",
        "https://127.0.0.1:8443/cdn/files/a.png",
    ],
)
def test_allowed_hosts(url: str) -> None:
    check_source(url, CDN)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://v3.fal.media/files/a.png", "not an https URL"),
        ("file:///etc/passwd", "not an https URL"),
        ("ftp://fal.media/a", "not an https URL"),
        ("https://evil.example/a.png", "not a fal CDN host"),
        ("https://fal.media.evil.example/a.png", "not a fal CDN host"),
        ("https://evilfal.media/a.png", "not a fal CDN host"),
        ("https://127.0.0.1:9999/cdn/a.png", "not a fal CDN host"),
        ("https://127.0.0.1/cdn/a.png", "not a fal CDN host"),
        ("https://v3.fal.media@evil.example/a.png", "malformed host"),
        ("https://v3.fal.media\\@evil.example/a.png", "malformed host"),
        ("https://v3.fal.media:99999/a.png", "malformed host"),
    ],
)
def test_refused_sources_say_why(url: str, why: str) -> None:
    with pytest.raises(OutputRefused, match=why) as caught:
        check_source(url, CDN)
    assert "kept on fal" in str(caught.value)


def test_messages_never_show_query_strings_or_user_info() -> None:
    shown = describe_url("https://user:pw@evil.example/a.png?token=s3cr3t#frag")
    assert "s3cr3t" not in shown
    assert "pw" not in shown
    assert "evil.example/a.png" in shown


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "a\\b.png", "x\x00.png"])
def test_file_names_that_are_paths_are_refused(name: str) -> None:
    with pytest.raises(OutputRefused, match="choose where they are stored"):
        check_file_name(name)


@pytest.mark.parametrize("name", [None, "image.png", "my picture (1).PNG", "..hidden.png", "é.png"])
def test_ordinary_file_names_pass(name: str | None) -> None:
    check_file_name(name)


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        (OutputFile("https://v3.fal.media/files/rabbit/a1.png"), "p/files/003-a1.png"),
        (
            OutputFile("https://v3.fal.media/x/y", file_name="My Video.MP4"),
            "p/files/003-My-Video.mp4",
        ),
        (OutputFile("https://v3.fal.media/x/..", file_name=None), "p/files/003-x"),
        (OutputFile("https://v3.fal.media/%2e%2e%2fetc%2fpasswd"), "p/files/003-passwd"),
        (
            OutputFile("https://v3.fal.media/x", file_name="a" * 500 + ".png"),
            f"p/files/003-{'a' * 60}.png",
        ),
        (OutputFile("https://v3.fal.media/x", file_name="archive.tar.verylongextension"), None),
    ],
)
def test_object_keys_are_derived_and_bounded(file: OutputFile, expected: str | None) -> None:
    key = object_key("p", 3, file)
    if expected is not None:
        assert key == expected
    name = key.removeprefix("p/files/")
    assert "/" not in name
    assert ".." not in name
    assert len(name) <= 80


def test_rewrite_replaces_every_occurrence_and_leaves_the_rest() -> None:
    output = {**FLUX_OUTPUT, "again": ["https://v3.fal.media/files/rabbit/a1.png"]}
    rewritten = rewrite_urls(output, {"https://v3.fal.media/files/rabbit/a1.png": "s3://b/k.png"})
    assert rewritten["images"][0]["url"] == "s3://b/k.png"
    assert rewritten["again"] == ["s3://b/k.png"]
    assert rewritten["images"][1] == FLUX_OUTPUT["images"][1]
    assert output["images"][0]["url"].startswith("https://")  # the original is untouched
