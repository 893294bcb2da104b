"""The operator-signed federation roster: round trips, membership over time, every refusal."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from aggregation.secagg import NodeIdentity, SecAggAuthenticationError, node_id_for
from manifests import dsse
from manifests.catalog import NodeType
from manifests.keys import SigningKey, TrustedKey, TrustedKeys
from manifests.manifest import canonical_json
from manifests.roster import (
    ROSTER_PAYLOAD_TYPE,
    Roster,
    RosterBadSignatureError,
    RosterEntry,
    RosterError,
    RosterFormatError,
    RosterKeyExpiredError,
    RosterKeyRevokedError,
    RosterKeyUntrustedError,
    RosterPayloadTypeError,
    RosterRollbackError,
    sign_roster,
    verify_roster,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 1, 1, tzinfo=UTC)
OPERATOR = SigningKey.from_seed(b"\x01" * 32)
STRANGER = SigningKey.from_seed(b"\x02" * 32)


def trusted(
    key: SigningKey = OPERATOR,
    *,
    not_before: datetime = T0,
    not_after: datetime = T0 + timedelta(days=3650),
    revoked: bool = False,
) -> TrustedKeys:
    return TrustedKeys.of([TrustedKey(key.public_key(), not_before, not_after, revoked)])


def identity(seed: int) -> NodeIdentity:
    return NodeIdentity.from_private_bytes(bytes([seed]) * 32)


def entry(seed: int, name: str | None = None, **extra: object) -> RosterEntry:
    values: dict[str, object] = {
        "name": f"node-{seed}" if name is None else name,
        "node_type": NodeType.SENSING,
        "identity_key": identity(seed).public_key,
        "not_before": T0,
        "not_after": T0 + timedelta(days=730),
        **extra,
    }
    return RosterEntry(**values)  # type: ignore[arg-type]


def make_roster(*seeds: int, federation: str = "lab", issued_at: datetime = NOW) -> Roster:
    return Roster.of(federation, issued_at, [entry(s) for s in seeds or (11, 12, 13)])


def signed_payload(document: object, key: SigningKey = OPERATOR) -> bytes:
    """An envelope over arbitrary payload bytes, validly signed."""
    payload = document if isinstance(document, bytes) else canonical_json(document)
    return dsse.sign(ROSTER_PAYLOAD_TYPE, payload, key).to_json()


# --------------------------------------------------------------------------- the roster


def test_roster_round_trips_through_a_signed_envelope() -> None:
    roster = make_roster()
    assert verify_roster(sign_roster(roster, OPERATOR), trusted(), now=NOW) == roster
    assert Roster.from_json(roster.to_json()) == roster


def test_signing_is_deterministic_and_entries_are_ordered_by_name() -> None:
    shuffled = Roster.of("lab", NOW, [entry(13), entry(11), entry(12)])
    assert sign_roster(shuffled, OPERATOR) == sign_roster(make_roster(11, 12, 13), OPERATOR)
    assert [e.name for e in shuffled.entries] == ["node-11", "node-12", "node-13"]


def test_node_ids_are_derived_from_the_identity_keys() -> None:
    roster = make_roster()
    members = roster.members(NOW)
    assert members == {identity(s).node_id: identity(s).public_key for s in (11, 12, 13)}
    assert all(node == node_id_for(key) for node, key in members.items())
    assert roster.entry(identity(12).node_id).name == "node-12"
    with pytest.raises(KeyError, match="not in the roster"):
        roster.entry(identity(99).node_id)


def test_members_are_only_the_entries_valid_at_the_time() -> None:
    late = entry(14, not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=9))
    expired = entry(15, not_before=T0, not_after=T0 + timedelta(days=1))
    roster = Roster.of("lab", NOW, [entry(11), late, expired])
    assert set(roster.members(NOW)) == {identity(11).node_id}
    assert identity(14).node_id in roster.members(NOW + timedelta(days=2))


def test_revoking_keeps_the_entry_but_ends_its_membership_at_that_time() -> None:
    roster = make_roster()
    node = identity(12).node_id
    revoked = roster.revoke(node, at=NOW + timedelta(hours=1))
    assert node in revoked.members(NOW)
    assert node not in revoked.members(NOW + timedelta(hours=1))
    assert revoked.entry(node).revoked_at == NOW + timedelta(hours=1)
    assert revoked.issued_at == NOW + timedelta(hours=1)
    assert Roster.from_json(revoked.to_json()) == revoked
    assert roster.entry(node).revoked_at is None  # a new roster; the old one is unchanged


def test_add_and_remove_return_new_rosters() -> None:
    roster = make_roster(11, 12)
    grown = roster.add(entry(13), issued_at=NOW + timedelta(days=1))
    assert len(grown.entries) == 3 and len(roster.entries) == 2
    shrunk = grown.remove(identity(11).node_id, issued_at=NOW + timedelta(days=2))
    assert identity(11).node_id not in shrunk.members(NOW + timedelta(days=2))
    with pytest.raises(ValueError, match="names listed more than once"):
        roster.add(entry(13, name="node-11"), issued_at=NOW)
    with pytest.raises(ValueError, match="same identity key"):
        roster.add(entry(11, name="other"), issued_at=NOW)


def test_secagg_roster_checks_signatures_of_current_members_only() -> None:
    roster = make_roster().revoke(identity(13).node_id, at=NOW)
    secagg = roster.secagg_roster(NOW)
    member, gone = identity(11), identity(13)
    secagg.verify(member.node_id, member.sign(b"statement"), b"statement")
    with pytest.raises(SecAggAuthenticationError, match="not in the roster"):
        secagg.verify(gone.node_id, gone.sign(b"statement"), b"statement")


def test_the_secagg_roster_follows_every_membership_change_although_it_is_built_once() -> None:
    late = entry(14, not_before=NOW + timedelta(hours=2), not_after=NOW + timedelta(days=9))
    ends = entry(15, not_before=T0, not_after=NOW + timedelta(hours=3))
    roster = Roster.of("lab", NOW, [entry(11), late, ends]).revoke(
        identity(11).node_id, at=NOW + timedelta(hours=1), issued_at=NOW
    )
    first = roster.secagg_roster(NOW)
    assert roster.secagg_roster(NOW + timedelta(minutes=59)) is first  # no change in between
    for hours, expected in [
        (0, {11, 15}),
        (1, {15}),  # 11 revoked
        (2, {14, 15}),  # 14 starts
        (3, {14, 15}),  # 15 is valid through its not_after...
        (3 + 1 / 3600, {14}),  # ...and not a second later
        (0, {11, 15}),  # back in time: rebuilt, not stale
    ]:
        at = NOW + timedelta(hours=hours)
        assert set(roster.secagg_roster(at)) == {identity(s).node_id for s in expected}
        assert set(roster.secagg_roster(at)) == set(roster.members(at))


def test_a_verified_envelope_is_checked_again_at_every_now_and_under_other_keys() -> None:
    envelope = sign_roster(make_roster(), OPERATOR)
    assert verify_roster(envelope, trusted(), now=NOW) == make_roster()  # now cached
    with pytest.raises(RosterKeyExpiredError, match="outside"):
        verify_roster(envelope, trusted(), now=T0 + timedelta(days=4000))
    with pytest.raises(RosterKeyRevokedError, match="revoked"):
        verify_roster(envelope, trusted(revoked=True), now=NOW)
    with pytest.raises(RosterKeyUntrustedError):
        verify_roster(envelope, trusted(STRANGER), now=NOW)
    document = json.loads(envelope)
    signature = bytearray(base64.b64decode(document["signatures"][0]["sig"]))
    signature[0] ^= 1
    document["signatures"][0]["sig"] = base64.b64encode(bytes(signature)).decode()
    with pytest.raises(RosterBadSignatureError):
        verify_roster(canonical_json(document), trusted(), now=NOW)


def test_entries_are_found_by_node_id() -> None:
    roster = make_roster(*range(20, 60))
    assert roster.entry(identity(33).node_id).name == "node-33"
    with pytest.raises(KeyError, match="not in the roster"):
        roster.entry(identity(99).node_id)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "`name` must be"),
        ({"name": "a b"}, "`name` must be"),
        ({"node_type": "toaster"}, "`node_type` must be one of"),
        ({"identity_key": b"\x00" * 31}, "32-byte"),
        ({"not_before": datetime(2025, 1, 1)}, "timezone-aware"),
        ({"not_after": T0}, "`not_after` must be later"),
    ],
)
def test_invalid_entries_are_refused(change: dict[str, object], message: str) -> None:
    values = {**entry(11).__dict__, **change}
    with pytest.raises(ValueError, match=message):
        RosterEntry(**values)


def test_an_empty_federation_name_is_refused() -> None:
    with pytest.raises(ValueError, match="`federation`"):
        make_roster(federation="")


# --------------------------------------------------------------------------- verification


def test_a_tampered_payload_fails_the_signature() -> None:
    envelope = json.loads(sign_roster(make_roster(), OPERATOR))
    grown = make_roster(11, 12, 13, 14)  # the server tries to add a member
    envelope["payload"] = base64.b64encode(grown.to_json()).decode()
    with pytest.raises(RosterBadSignatureError, match="does not verify"):
        verify_roster(json.dumps(envelope).encode(), trusted(), now=NOW)


def test_one_flipped_byte_anywhere_in_the_roster_file_is_refused() -> None:
    data = sign_roster(make_roster(), OPERATOR)
    for index in range(len(data)):
        flipped = bytearray(data)
        flipped[index] ^= 0x01
        with pytest.raises(RosterError):
            verify_roster(bytes(flipped), trusted(), now=NOW)


def test_a_roster_signed_by_a_key_that_is_not_an_operator_is_refused() -> None:
    with pytest.raises(RosterKeyUntrustedError, match="not in the trusted-keys file"):
        verify_roster(sign_roster(make_roster(), STRANGER), trusted(), now=NOW)


def test_a_roster_signed_by_a_revoked_operator_key_is_refused() -> None:
    with pytest.raises(RosterKeyRevokedError, match="revoked"):
        verify_roster(sign_roster(make_roster(), OPERATOR), trusted(revoked=True), now=NOW)


@pytest.mark.parametrize(
    ("issued_at", "now"),
    [
        (NOW, T0 + timedelta(days=4000)),  # the key has expired by now
        (T0 - timedelta(days=1), NOW),  # issued before the key's window
    ],
)
def test_a_roster_outside_the_operator_keys_window_is_refused(
    issued_at: datetime, now: datetime
) -> None:
    roster = make_roster(issued_at=issued_at)
    with pytest.raises(RosterKeyExpiredError, match="outside"):
        verify_roster(sign_roster(roster, OPERATOR), trusted(), now=now)


def test_an_envelope_of_another_payload_type_is_refused() -> None:
    other = dsse.sign("application/vnd.fedbrain.job+json", make_roster().to_json(), OPERATOR)
    with pytest.raises(RosterPayloadTypeError, match="payloadType"):
        verify_roster(other.to_json(), trusted(), now=NOW)


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"payload": "", "payloadType": "x"}',
        b'{"payload":"e30=","payload":"e30=","payloadType":"'
        + ROSTER_PAYLOAD_TYPE.encode()
        + b'","signatures":[]}',
    ],
    ids=["not-json", "not-object", "missing-signatures", "duplicate-keys"],
)
def test_a_malformed_envelope_is_refused(data: bytes) -> None:
    with pytest.raises(RosterFormatError):
        verify_roster(data, trusted(), now=NOW)


def test_an_envelope_with_two_signatures_is_refused() -> None:
    envelope = json.loads(sign_roster(make_roster(), OPERATOR))
    envelope["signatures"] *= 2
    with pytest.raises(RosterFormatError, match="exactly one signature"):
        verify_roster(json.dumps(envelope).encode(), trusted(), now=NOW)


def _roster_document() -> dict[str, object]:
    document: dict[str, object] = json.loads(make_roster().to_json())
    return document


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            b'{"federation":"lab","federation":"evil","issued_at":"2026-01-01T00:00:00Z",'
            b'"members":[],"version":1}',
            "duplicate JSON key",
        ),
        (b'{"version": NaN}', "non-finite"),
        ({**_roster_document(), "extra": 1}, "unknown fields"),
        ({**_roster_document(), "version": 2}, "version must be 1"),
        ({**_roster_document(), "issued_at": "yesterday"}, "issued_at"),
        ({**_roster_document(), "members": [{"name": "x"}]}, "missing fields"),
    ],
    ids=["duplicate-keys", "nan", "unknown-field", "version", "timestamp", "entry-fields"],
)
def test_a_validly_signed_but_malformed_roster_is_refused(payload: object, message: str) -> None:
    with pytest.raises(RosterFormatError, match=message):
        verify_roster(signed_payload(payload), trusted(), now=NOW)


def test_a_validly_signed_roster_with_a_duplicate_key_is_refused() -> None:
    document = _roster_document()
    members = document["members"]
    assert isinstance(members, list)
    twin = dict(members[0], name="twin")
    document["members"] = [*members, twin]
    with pytest.raises(RosterFormatError, match="same identity key"):
        verify_roster(signed_payload(document), trusted(), now=NOW)


def test_an_older_roster_or_another_federation_is_refused_as_a_rollback() -> None:
    held = make_roster(issued_at=NOW)
    older = sign_roster(make_roster(11, 12, 13, 14, issued_at=NOW - timedelta(days=1)), OPERATOR)
    with pytest.raises(RosterRollbackError, match="before the one"):
        verify_roster(older, trusted(), now=NOW, previous=held)
    foreign = sign_roster(make_roster(federation="other"), OPERATOR)
    with pytest.raises(RosterRollbackError, match="federation"):
        verify_roster(foreign, trusted(), now=NOW, previous=held)
    newer = make_roster(11, 12, issued_at=NOW + timedelta(days=1))
    assert verify_roster(sign_roster(newer, OPERATOR), trusted(), now=NOW, previous=held) == newer
