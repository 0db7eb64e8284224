"""Site-secret pseudonyms: deterministic per secret, secret file private and never replaced."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from triage.errors import AuditError
from triage.pseudonym import default_secret_path, load_or_create_secret, pseudonymize


def test_pseudonyms_are_deterministic_per_secret_and_differ_across_secrets():
    one, two = b"\x01" * 32, b"\x02" * 32
    assert pseudonymize("MRN-8675309", one) == pseudonymize("MRN-8675309", one) == pseudonymize(" MRN-8675309 ", one)
    assert pseudonymize("MRN-8675309", one) != pseudonymize("MRN-8675309", two)
    assert pseudonymize("MRN-8675309", one) != pseudonymize("MRN-8675310", one)
    pseudo = pseudonymize("MRN-8675309", one)
    assert len(pseudo) == 16 and int(pseudo, 16) >= 0 and "8675309" not in pseudo


def test_an_empty_id_has_an_empty_pseudonym():
    assert pseudonymize("", b"\x01" * 32) == "" and pseudonymize("   ", b"\x01" * 32) == ""


def test_the_secret_is_created_private_once_and_never_overwritten(tmp_path):
    path = tmp_path / "site" / "site-secret.key"
    secret = load_or_create_secret(path)
    assert len(secret) == 32 and path.read_bytes() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == secret
    assert [p.name for p in path.parent.iterdir()] == ["site-secret.key"]  # no temporary file left behind
    assert load_or_create_secret(tmp_path / "other.key") != secret


def test_a_damaged_secret_is_an_error_not_a_silent_new_key(tmp_path):
    path = tmp_path / "site-secret.key"
    path.write_bytes(b"short")
    with pytest.raises(AuditError, match=r"site-secret\.key: .*5 bytes, not 32.*Fix: restore"):
        load_or_create_secret(path)
    assert path.read_bytes() == b"short"


def test_an_unreadable_secret_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "site-secret.key"
    path.mkdir()  # unreadable as a file, even for root
    with pytest.raises(AuditError, match=r"site-secret\.key: cannot read .*Fix:"):
        load_or_create_secret(path)


def test_the_secret_sits_beside_the_audit_db_unless_the_environment_says_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_TRIAGE_SECRET", raising=False)
    assert default_secret_path(tmp_path / "audit.sqlite") == tmp_path / "site-secret.key"
    monkeypatch.setenv("CXR_TRIAGE_SECRET", "/secure/key")
    assert default_secret_path(tmp_path / "audit.sqlite") == Path("/secure/key")
