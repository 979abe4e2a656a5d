"""The Platform API's storage controls with raw httpx: the account's storage settings (and how
they apply to new files), per-file ACLs and signed URLs."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import httpx
import pytest

from falflow.emulator import RunningEmulator
from falflow.emulator.config import Acl, StorageSettings
from tests.support.emulator import submit, wait_completed

SETTINGS = "/v1/storage/settings"
ACL = "/v1/storage/files/acl"
SIGN = "/v1/storage/files/sign"
FLUX = "fal-ai/flux/schnell"
EMPTY = {"expiration_duration_seconds": None, "initial_acl": None}
FORBID = {"default": "forbid", "rules": []}


def upload(http: httpx.Client, data: bytes = b"data", lifecycle: Any = None) -> str:
    grant = http.post("/rest/storage/auth/token", json={}).json()
    headers = {"Authorization": f"Bearer {grant['token']}", "Content-Type": "image/png"}
    if lifecycle is not None:
        headers["X-Fal-Object-Lifecycle"] = json.dumps(lifecycle)
    answer = http.post(f"{grant['base_url']}/files/upload", headers=headers, content=data)
    assert answer.status_code == 200, answer.text
    url: str = answer.json()["access_url"]
    return url


def output(http: httpx.Client, lifecycle: Any = None) -> str:
    headers = {}
    if lifecycle is not None:
        headers["X-Fal-Object-Lifecycle-Preference"] = json.dumps(lifecycle)
    submitted = submit(http, FLUX, {"prompt": "stored"}, **headers)
    wait_completed(http, submitted["status_url"])
    url: str = http.get(submitted["response_url"]).json()["images"][0]["url"]
    return url


def held(emulator: RunningEmulator) -> dict[str, dict[str, Any]]:
    return {f["url"]: f for f in emulator.inventory(hashes=False)["files"]}


def lifetime(record: dict[str, Any]) -> float | None:
    if record["expires_at"] is None:
        return None
    expires = datetime.fromisoformat(record["expires_at"])
    return (expires - datetime.fromisoformat(record["created_at"])).total_seconds()


def assert_error(answer: httpx.Response, status: int, error_type: str) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["type"] == error_type
    assert error["message"]


def test_settings_start_empty_and_put_replaces_them_whole(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    assert http.get(SETTINGS).json() == EMPTY
    full = {
        "expiration_duration_seconds": 86400,
        "initial_acl": {
            "default": "forbid",
            "rules": [{"user": "emulator-user", "decision": "allow"}],
        },
    }
    saved = http.put(SETTINGS, json=full)
    assert saved.status_code == 200
    assert saved.json() == full
    assert http.get(SETTINGS).json() == full
    # Omitted fields are cleared; rules naming users that do not exist are dropped.
    partial = {
        "initial_acl": {"default": "hide", "rules": [{"user": "nobody", "decision": "allow"}]}
    }
    assert http.put(SETTINGS, json=partial).json() == {
        "expiration_duration_seconds": None,
        "initial_acl": {"default": "hide", "rules": []},
    }
    assert http.put(SETTINGS, json={"initial_acl": {"default": "allow"}}).json() == {
        "expiration_duration_seconds": None,
        "initial_acl": {"default": "allow", "rules": []},
    }
    assert http.put(SETTINGS, json={}).json() == EMPTY
    assert http.get(SETTINGS).json() == EMPTY
    admin = {"Authorization": f"Key {emulator.admin_key}"}
    assert http.get(SETTINGS, headers=admin).status_code == 200  # any valid key
    assert http.put(SETTINGS, json=full, headers=admin).json() == full
    assert emulator.storage_settings() == StorageSettings.model_validate(full)
    for headers in ({"Authorization": ""}, {"Authorization": "Key wrong"}):
        assert_error(http.get(SETTINGS, headers=headers), 401, "authorization_error")
        assert_error(http.put(SETTINGS, json={}, headers=headers), 401, "authorization_error")
    assert http.get(SETTINGS).json() == full  # a refused PUT changed nothing


@pytest.mark.parametrize(
    "body",
    [
        {"expiration_duration_seconds": 0},
        {"expiration_duration_seconds": -5},
        {"expiration_duration_seconds": "60"},
        {"expiration_duration_seconds": 1.5},
        {"expiration_duration_seconds": True},
        {"initial_acl": {"default": "public"}},
        {"initial_acl": {"rules": []}},
        {"initial_acl": {"default": "allow", "extra": 1}},
        {"initial_acl": {"default": "allow", "rules": [{"user": "", "decision": "allow"}]}},
        {"initial_acl": {"default": "allow", "rules": [{"user": "u", "decision": "maybe"}]}},
        {"unknown_field": 1},
        [],
        None,
    ],
)
def test_invalid_settings_are_400(emulator: RunningEmulator, http: httpx.Client, body: Any) -> None:
    emulator.set_storage_settings(expiration_duration_seconds=60)
    answer = http.put(SETTINGS, content=b"" if body is None else json.dumps(body))
    assert_error(answer, 400, "validation_error")
    assert http.get(SETTINGS).json()["expiration_duration_seconds"] == 60


def test_account_settings_apply_to_new_files_without_a_lifecycle(
    emulator: RunningEmulator, http: httpx.Client
) -> None:
    before = upload(http)
    saved = emulator.set_storage_settings(
        expiration_duration_seconds=600, initial_acl={"default": "forbid"}
    )
    assert saved == StorageSettings(
        expiration_duration_seconds=600, initial_acl=Acl(default="forbid")
    )
    plain_upload = upload(http)
    plain_output = output(http)
    never = upload(http, lifecycle={"expiration_duration_seconds": None})
    public = upload(http, lifecycle={"initial_acl": {"default": "allow"}})
    system_default = upload(http, lifecycle={"initial_acl": None})
    hidden_output = output(
        http, lifecycle={"expiration_duration_seconds": 120, "initial_acl": {"default": "hide"}}
    )
    files = held(emulator)
    expected = {
        before: (None, "allow"),  # made before the settings changed: unchanged
        plain_upload: (600, "forbid"),
        plain_output: (600, "forbid"),
        never: (None, "forbid"),  # explicit null: never expires (not the account default)
        public: (600, "allow"),
        system_default: (600, "allow"),  # explicit null ACL: the system default, public
        hidden_output: (120, "hide"),
    }
    assert {url: (lifetime(files[url]), files[url]["acl"]) for url in expected} == expected
    statuses = {url: http.get(url).status_code for url in expected}
    assert statuses == {
        before: 200,
        plain_upload: 403,
        plain_output: 403,
        never: 403,
        public: 200,
        system_default: 200,
        hidden_output: 404,
    }
    assert http.get(ACL, params={"url": plain_output}).json() == FORBID

    emulator.advance_clock(601)
    assert set(held(emulator)) == {before, never}
    assert [http.get(u).status_code for u in (plain_upload, public)] == [404, 404]


def test_config_seeds_the_account_settings(emulator: RunningEmulator, http: httpx.Client) -> None:
    emulator.configure(default_expiration_seconds=120, default_initial_acl=FORBID)
    assert http.get(SETTINGS).json() == {"expiration_duration_seconds": 120, "initial_acl": FORBID}
    url = upload(http)
    assert (lifetime(held(emulator)[url]), http.get(url).status_code) == (120, 403)
    http.put(SETTINGS, json={})  # the account settings, not the config, rule at runtime
    later = upload(http)
    assert lifetime(held(emulator)[later]) is None
    emulator.reset()
    assert http.get(SETTINGS).json() == EMPTY


def test_file_acl_get_and_put(emulator: RunningEmulator, http: httpx.Client) -> None:
    url = upload(http)
    assert http.get(ACL, params={"url": url}).json() == {"default": "allow", "rules": []}
    for decision, status in (("forbid", 403), ("hide", 404), ("allow", 200)):
        put = http.put(ACL, params={"url": url}, json={"default": decision})
        assert put.status_code == 200
        assert put.json() == {"default": decision, "rules": []}
        assert http.get(ACL, params={"url": url}).json()["default"] == decision
        assert http.get(url).status_code == status
        assert http.head(url).status_code == status
        assert held(emulator)[url]["acl"] == decision  # held whatever its ACL

    emulator.configure(acl_known_users=["teammate"])
    rules = [
        {"user": "teammate", "decision": "allow"},
        {"user": "ghost", "decision": "allow"},
        {"user": "emulator-user", "decision": "hide"},
    ]
    applied = http.put(ACL, params={"url": url}, json={"default": "forbid", "rules": rules})
    assert applied.json() == {"default": "forbid", "rules": [rules[0], rules[2]]}
    assert http.get(url).status_code == 403  # the CDN knows no user: the default applies
    admin = {"Authorization": f"Key {emulator.admin_key}"}
    assert http.get(ACL, params={"url": url}, headers=admin).json()["rules"] == [rules[0], rules[2]]

    gone = upload(http, lifecycle={"expiration_duration_seconds": 60})
    emulator.advance_clock(61)
    unknown = f"{emulator.base_url}/cdn/files/0123456789abcdef/none.png"
    for params in ({"url": unknown}, {"url": gone}):
        assert_error(http.get(ACL, params=params), 404, "not_found")
        assert_error(http.put(ACL, params=params, json=FORBID), 404, "not_found")
    for params in ({}, {"url": url + "?x=1"}, {"url": "https://v3.fal.media/files/a/b.png"}):
        assert_error(http.get(ACL, params=params), 400, "validation_error")
    bodies: list[Any] = [{"default": "nobody"}, {"rules": []}, {"default": "allow", "more": 1}, []]
    for body in bodies:
        assert_error(http.put(ACL, params={"url": url}, json=body), 400, "validation_error")
    assert_error(http.put(ACL, params={"url": url}, content=b"{not json"), 400, "validation_error")
    for headers in ({"Authorization": ""}, {"Authorization": "Key wrong"}):
        assert_error(
            http.get(ACL, params={"url": url}, headers=headers), 401, "authorization_error"
        )
        assert_error(
            http.put(ACL, params={"url": url}, json=FORBID, headers=headers),
            401,
            "authorization_error",
        )
    assert http.get(ACL, params={"url": url}).json()["default"] == "forbid"


def test_sign_validation_and_errors(emulator: RunningEmulator, http: httpx.Client) -> None:
    url = upload(http)
    signed = http.post(SIGN, params={"url": url}, json={"expiration_seconds": 604800})
    assert signed.status_code == 200
    assert signed.json()["signed_url"].startswith(url + "?identity=")
    for body in (
        {"expiration_seconds": 0},
        {"expiration_seconds": 604801},
        {"expiration_seconds": "60"},
        {"expiration_seconds": 60, "extra": True},
        {},
    ):
        answer = http.post(SIGN, params={"url": url}, json=body)
        assert_error(answer, 400, "validation_error")
    assert_error(
        http.post(SIGN, params={"url": url + "?a=b"}, json={"expiration_seconds": 1}),
        400,
        "validation_error",
    )
    unknown = f"{emulator.base_url}/cdn/files/0123456789abcdef/none.png"
    assert_error(
        http.post(SIGN, params={"url": unknown}, json={"expiration_seconds": 1}), 404, "not_found"
    )
    assert_error(
        http.post(
            SIGN, params={"url": url}, json={"expiration_seconds": 1}, headers={"Authorization": ""}
        ),
        401,
        "authorization_error",
    )
    admin = {"Authorization": f"Key {emulator.admin_key}"}
    assert (
        http.post(
            SIGN, params={"url": url}, json={"expiration_seconds": 1}, headers=admin
        ).status_code
        == 200
    )
