"""The admission webhooks' checks (gpupool.admission), without a cluster. The same cases go
through the real API server in tests/integration/test_admission.py."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from gpupool import admission
from gpupool.models import parse_subscription_spec

Obj = dict[str, Any]


def pool_spec(**over: Any) -> Obj:
    spec: Obj = {"model": {"id": "org/m"}, "seats": 4,
                 "blocks": {"europe": {"price": "39.00"},
                            "americas": {"price": "39.00", "seats": 4}}}
    spec.update(over)
    return spec


def with_ledger(spec: Obj, ledger: Obj, reserved: Obj | None = None) -> Obj:
    status: Obj = {"ledger": ledger}
    if reserved:
        status["seats"] = {b: {"reserved": n} for b, n in reserved.items()}
    return {"spec": spec, "status": status}


LEDGER = {"a": {"uid": "1", "seats": {"europe": [0, 1], "americas": [0, 1]}},
          "b": {"uid": "2", "seats": {"europe": [2]}}}


def test_valid_pool_passes() -> None:
    assert admission.check_pool({"spec": pool_spec(runtime={"extraArgs": [
        "--max-model-len", "4096"]})}, None) == []


@pytest.mark.parametrize(("args", "expected"), [
    (["--model", "x"], "--model is set by the operator; remove it (--model comes from "
                       "spec.model.id)"),
    (["--port=9000"], "--port comes from spec.runtime.port"),
    (["--served_model", "x"], "--served_model comes from spec.model.id"),
    (["-tp", "2"], "-tp comes from spec.runtime.gpusPerReplica"),
    (["--api-key", "k"], "--api-key comes from the operator"),
])
def test_owned_args_are_refused_with_their_source(args: list[str], expected: str) -> None:
    [problem] = admission.check_pool({"spec": pool_spec(runtime={"extraArgs": args})}, None)
    assert problem.startswith("spec.runtime.extraArgs: ")
    assert expected in problem


def test_owned_env_is_refused() -> None:
    [problem] = admission.check_pool({"spec": pool_spec(runtime={"env": [
        {"name": "VLLM_API_KEY", "value": "x"}, {"name": "HF_HOME", "value": "/c"}]})}, None)
    assert problem.startswith("spec.runtime.env: VLLM_API_KEY is set by the operator")


@pytest.mark.parametrize(("over", "expected"), [
    ({"reservationFee": "-1.00"}, "spec.reservationFee: -1.00 is negative"),
    ({"reservationFee": "1.005"}, "spec.reservationFee: 1.005 has more than two decimals"),
    ({"annualDiscount": "1"}, "spec.annualDiscount: 1 would make a yearly subscription free"),
    ({"annualDiscount": "1.5"}, "spec.annualDiscount: 1.5 would make"),
    ({"annualDiscount": "-0.1"}, "spec.annualDiscount: -0.1 is negative"),
    ({"annualDiscount": "lots"}, "spec.annualDiscount: 'lots' is not a number"),
    ({"blocks": {"europe": {"price": "-5"}}}, "spec.blocks.europe.price: -5 is negative"),
    ({"blocks": {"europe": {"price": "abc"}}}, "spec.blocks.europe.price: 'abc' is not an"),
])
def test_money_is_refused_readably(over: Obj, expected: str) -> None:
    problems = admission.check_pool({"spec": pool_spec(**over)}, None)
    assert any(p.startswith(expected) for p in problems), problems


def test_money_that_is_fine() -> None:
    assert admission.money_problems({"reservationFee": "0", "annualDiscount": "0.9999",
                                     "blocks": {"asia": {"price": "0.50"}}}) == []


def test_a_spec_the_model_refuses_names_the_field() -> None:
    [problem] = admission.check_pool({"spec": pool_spec(seats=-1)}, None)
    assert problem.startswith("spec.seats: ")


def test_seats_cannot_drop_below_those_held() -> None:
    old = with_ledger(pool_spec(), LEDGER)
    assert admission.check_pool({"spec": pool_spec(seats=3)}, old) == []
    assert admission.check_pool({"spec": pool_spec(seats=2)}, old) == [
        "spec.seats: would leave europe 2 seat(s), but 3 are held by subscription(s) a, b; "
        "use 3 or more"]
    [problem] = admission.check_pool({"spec": pool_spec(blocks={
        "europe": {"price": "39.00"}, "americas": {"price": "39.00", "seats": 1}})}, old)
    assert problem.startswith("spec.blocks.americas.seats: would leave americas 1 seat(s), but "
                              "2 are held by subscription(s) a; use 2 or more")


def test_a_held_block_cannot_go_but_a_free_one_can() -> None:
    old = with_ledger(pool_spec(blocks={"asia": {"price": "1.00"}, "europe": {"price": "39.00"},
                                        "americas": {"price": "39.00"}}), LEDGER)
    assert admission.check_pool({"spec": pool_spec()}, old) == []  # asia had no holders
    [problem] = admission.check_pool({"spec": pool_spec(blocks={"europe": {"price": "39.00"}})},
                                     old)
    assert problem.startswith("spec.blocks.americas: 2 seat(s) in americas are held by "
                              "subscription(s) a; keep offering americas")


def test_reserved_counts_cover_a_ledger_not_yet_seen() -> None:
    old = with_ledger(pool_spec(), {}, reserved={"europe": 4})
    [problem] = admission.check_pool({"spec": pool_spec(seats=3)}, old)
    assert "but 4 are held" in problem


def test_metadata_only_updates_are_not_judged() -> None:
    bad = {"spec": pool_spec(runtime={"extraArgs": ["--model", "x"]})}
    assert admission.check_pool(bad, bad) == []


def test_an_update_is_refused_for_what_it_brings_not_for_what_was_there() -> None:
    """A Pool stored with problems (before the webhook, or while it was down) can still be
    paused or partly fixed; a new problem is refused with the whole list."""
    bad = pool_spec(runtime={"extraArgs": ["--model", "x", "--port", "1"]})
    old = {"spec": bad}
    assert admission.check_pool({"spec": {**bad, "paused": True}}, old) == []
    assert admission.check_pool({"spec": pool_spec(runtime={"extraArgs": ["--port", "1"]})},
                                old) == []
    [problem] = admission.check_pool({"spec": pool_spec(runtime={"extraArgs": [
        "--model", "x", "--port", "1", "--host", "h"]})}, old)
    assert problem.startswith("spec.runtime.extraArgs: --model, --port, --host are set")

    # Already below its holders: pausing is fine, cutting further is not.
    below = with_ledger(pool_spec(seats=2), LEDGER)
    assert admission.check_pool({"spec": pool_spec(seats=2, paused=True)}, below) == []
    assert admission.check_pool({"spec": pool_spec(seats=1)}, below)[0].startswith(
        "spec.seats: would leave europe 1 seat(s), but 3 are held")


def sub_spec(**over: Any) -> Any:
    spec: Obj = {"poolRef": {"name": "p"}, "customer": {"id": "c"}, "blocks": ["europe"],
                 "quantity": 1}
    spec.update(over)
    return parse_subscription_spec(spec)


HOLDING = {"status": {"pool": "p", "heldBlocks": ["europe"], "heldQuantity": 1}}


def test_held_terms_are_locked() -> None:
    assert admission.locked_problems(sub_spec(), "ns", HOLDING) == []
    assert admission.locked_problems(sub_spec(billingCycle="year", cancelAtPeriodEnd=True),
                                     "ns", HOLDING) == []
    assert admission.locked_problems(sub_spec(poolRef={"name": "p", "namespace": "ns"}), "ns",
                                     HOLDING) == []
    problems = admission.locked_problems(
        sub_spec(poolRef={"name": "q"}, blocks=["europe", "asia"], quantity=2), "ns", HOLDING)
    assert [p.split(":")[0] for p in problems] == ["spec.poolRef", "spec.blocks", "spec.quantity"]
    assert "keep spec.blocks [europe]" in problems[1]
    # Not holding seats (pending): anything may change.
    assert admission.locked_problems(sub_spec(quantity=3), "ns", {"status": {}}) == []


def test_terms_changed_while_the_webhook_was_down_do_not_block_a_cancel() -> None:
    drifted = {**HOLDING, "spec": {"poolRef": {"name": "p"}, "customer": {"id": "c"},
                                   "blocks": ["americas"], "quantity": 1}}
    assert admission.locked_problems(sub_spec(blocks=["americas"], cancelAtPeriodEnd=True),
                                     "ns", drifted) == []
    [problem] = admission.locked_problems(sub_spec(blocks=["americas"], quantity=2), "ns",
                                          drifted)
    assert problem.startswith("spec.quantity: ")
    assert admission.locked_problems(sub_spec(), "ns", drifted) == []  # back to the held terms


def test_night_is_asia_for_the_lock() -> None:
    holding = {"status": {"pool": "p", "heldBlocks": ["asia"], "heldQuantity": 1}}
    assert admission.locked_problems(sub_spec(blocks=["night"]), "ns", holding) == []


def published_pool(**over: Any) -> Obj:
    return {"spec": pool_spec(published=True, **over)}


def test_pool_ref_problems() -> None:
    ok = admission.pool_ref_problems
    assert ok(sub_spec(), "ns", published_pool(), ["p"]) == []
    [missing] = ok(sub_spec(), "ns", None, ["q", "r"])
    assert missing == ("spec.poolRef.name: pool p does not exist in namespace ns; create the "
                       "Pool first or name an existing one (published pools in ns: q, r)")
    [draft] = ok(sub_spec(), "ns", {"spec": pool_spec()}, [])
    assert draft.startswith("spec.poolRef.name: pool p is not published (draft)")
    assert "no pool in ns is published yet" in draft
    [abroad] = ok(sub_spec(poolRef={"name": "p", "namespace": "other"}), "ns", None, [])
    assert abroad.startswith("spec.poolRef.namespace: pool other/p is in another namespace")
    [blocks] = ok(sub_spec(blocks=["asia", "europe"]), "ns", published_pool(), [])
    assert blocks == "spec.blocks: pool p does not sell asia; choose from europe, americas"
    # A Pool with a broken spec is the Pool's problem (its Ready condition), not this one's.
    assert ok(sub_spec(), "ns", {"spec": {"published": True}}, []) == []


def test_served_namespaces_follow_kopf_patterns() -> None:
    every = admission.AdmissionOptions(port=1)
    assert every.serves("anything")
    some = admission.AdmissionOptions(port=1, namespaces=("team-*", "ops"))
    assert some.serves("team-a") and some.serves("ops") and not some.serves("default")
    not_x = admission.AdmissionOptions(port=1, namespaces=("!x-*",))
    assert not_x.serves("default") and not not_x.serves("x-1")


def test_options_from_env() -> None:
    opts = admission.AdmissionOptions.from_env(9443, ["a"], {
        admission.ENV_SERVICE: "gpupool/gpupool-operator-admission",
        admission.ENV_CONFIGURATION: "c.gpupool.dev", admission.ENV_ADDR: "127.0.0.1"})
    assert opts.configuration == "c.gpupool.dev" and opts.addr == "127.0.0.1"
    assert "gpupool-operator-admission.gpupool.svc" in opts.hostnames()
    assert {"localhost", "127.0.0.1"} <= set(opts.hostnames())
    assert admission.AdmissionOptions.from_env(1, [], {}).configuration == "gpupool.dev"
    with pytest.raises(ValueError, match=admission.ENV_SERVICE):
        admission.AdmissionOptions.from_env(1, [], {admission.ENV_SERVICE: "no-slash"})


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake in memory; raises what the client's verification raises."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    done = {"srv": False, "cli": False}
    for _ in range(20):
        for name, side in (("cli", cli), ("srv", srv)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_self_signed_certificate_verifies_for_its_names(tmp_path: Any) -> None:
    ca, cert, key = admission.make_self_signed(["svc.ns.svc", "localhost", "127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client = ssl.create_default_context(cadata=ca.decode())
    for name in ("svc.ns.svc", "localhost", "127.0.0.1"):
        _handshake(server, client, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, client, "other.example")
    # The CA is only the CA: a client trusting the system roots does not trust the server.
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, ssl.create_default_context(), "localhost")
