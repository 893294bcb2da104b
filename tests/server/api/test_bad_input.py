"""Bad input: every problem of a form at once with field names (422), oversized bodies (413),
unknown things (404), and never a stack trace in a response."""

from __future__ import annotations

from server.api.auth import Role
from server.ledger import Ledger
from tests.server.api.conftest import Api

BAD_FORM = {
    "component": "vision",
    "base_model": "vit-base16",
    "task": "embed",
    "embedding_dim": True,
    "epochs": "3",
    "quantize": "yes",
    "federation": {"num_rounds": 0},
    "dp.delta": 2,
}


def _no_trace(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text and "sqlalchemy" not in text.lower()


def test_an_invalid_form_gets_every_error_with_its_field_at_once(api: Api) -> None:
    for path in ("/api/v1/jobs/resolve", "/api/v1/jobs"):
        response = api.client.post(path, headers=api.headers("operator"), json=BAD_FORM)
        assert response.status_code == 422
        errors = response.json()["errors"]
        assert {e["field"] for e in errors} >= {
            "embedding_dim",
            "epochs",
            "quantize",
            "federation.num_rounds",
            "dp.delta",
        }
        assert all(e["message"] for e in errors)
        _no_trace(response.text)
    # nothing was queued by the refused submission
    assert api.client.get("/api/v1/jobs", headers=api.headers("viewer")).json() == []


def test_a_model_too_large_for_the_machine_is_refused_by_the_form(api: Api) -> None:
    form = {**{k: BAD_FORM[k] for k in ("component", "base_model", "task")}, "embedding_dim": 8}
    response = api.client.post(
        "/api/v1/jobs/resolve",
        headers=api.headers("viewer"),
        json={**form, "hidden_size": 10**8},
    )
    assert response.status_code == 422
    (error,) = response.json()["errors"]
    assert error["field"] == "hidden_size" and "parameters" in error["message"]


def test_malformed_json_duplicate_keys_and_non_objects_are_422(api: Api) -> None:
    headers = {**api.headers("viewer"), "Content-Type": "application/json"}
    for body in (b"{", b'{"epochs": 1, "epochs": 2}', b"[1, 2]", b'{"x": NaN}'):
        response = api.client.post("/api/v1/jobs/resolve", headers=headers, content=body)
        assert response.status_code == 422, body
        _no_trace(response.text)


def test_an_oversized_body_is_refused_before_it_is_read(api: Api) -> None:
    big = b'{"component": "' + b"x" * (70 * 1024) + b'"}'
    response = api.client.post(
        "/api/v1/jobs",
        headers={**api.headers("operator"), "Content-Type": "application/json"},
        content=big,
    )
    assert response.status_code == 413
    _no_trace(response.text)


def test_unknown_run_job_and_key_are_404(api: Api) -> None:
    for method, path, role in (
        ("GET", "/api/v1/runs/nope", Role.VIEWER),
        ("GET", "/api/v1/runs/nope/rounds", Role.VIEWER),
        ("GET", "/api/v1/runs/nope/bundle", Role.VIEWER),
        ("GET", "/api/v1/jobs/nope", Role.VIEWER),
        ("POST", "/api/v1/jobs/nope/cancel", Role.OPERATOR),
        ("DELETE", "/api/v1/keys/nope", Role.ADMIN),
    ):
        response = api.client.request(method, path, headers=api.headers(role.value))
        assert response.status_code == 404, path
        _no_trace(response.text)


def test_query_parameters_are_validated(api: Api) -> None:
    response = api.client.get("/api/v1/runs?limit=0", headers=api.headers("viewer"))
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "limit"
    response = api.client.get("/api/v1/runs?status=bogus", headers=api.headers("viewer"))
    assert response.status_code == 422


def test_the_run_view_shows_refused_nodes_and_clear_round_names(api: Api) -> None:
    from server.ledger import RoundRecord

    with Ledger(api.database_url) as ledger:
        ledger.start_run(
            run_id="run-r",
            artifact_name="sensing-iot-normalizer-v1",
            job={"federation.num_rounds": 2, "dp.epsilon_budget": 10.0},
            privacy_level="dp+secure-agg",
            dp_unit="example",
        )
        ledger.record_refused_nodes(
            "run-r", {2**64 - 2: "node type 'encoder', the job needs 'sensing'"}
        )
        ledger.record_round(
            "run-r",
            RoundRecord(
                round=1,
                sampled=3,
                responded=3,
                metrics={"eval": {"eval_loss": 0.5, "eval_accuracy": float("nan")}},
                epsilon=1.0,
                reliability=0.9,
            ),
        )
    run = api.client.get("/api/v1/runs/run-r", headers=api.headers("viewer")).json()
    assert run["refused_nodes"] == [
        {
            "node_id": str(2**64 - 2),
            "reason": "node type 'encoder', the job needs 'sensing'",
            "recorded_at": run["refused_nodes"][0]["recorded_at"],
        }
    ]
    assert run["epsilon_budget"] == 10.0 and run["num_rounds"] == 2
    (round_,) = api.client.get("/api/v1/runs/run-r/rounds", headers=api.headers("viewer")).json()
    assert round_["eval_loss"] == 0.5 and round_["eval_accuracy"] == "NaN"
    assert round_["epsilon_spent"] == 1.0 and round_["nodes_sampled"] == 3
    assert "loss" not in round_
    listing = api.client.get("/api/v1/runs", headers=api.headers("viewer")).json()
    assert listing["total"] == 1 and listing["runs"][0]["epsilon_spent"] is None
