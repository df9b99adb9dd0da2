"""The deployments API over real HTTP against a real controller process and etcd."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import dump_sync
from tests.support.processes import Proc, start_controller, wait_for

ADMIN, READER = "admin-token-123", "read-token-456"


@pytest.fixture(scope="module")
def module_prefix() -> str:
    import uuid

    return f"/eep-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def controller(etcd_server: Any, module_prefix: str) -> Iterator[Proc]:
    if etcd_server.proc is None:
        etcd_server.start()
    proc = start_controller(
        etcd_server.endpoint,
        module_prefix,
        env={
            "EEP_AUTH_TOKENS": f"{ADMIN}:admin,{READER}:read",
            "EEP_SERVER_MAX_BODY_BYTES": "65536",
        },
    )
    yield proc
    proc.stop()


@pytest.fixture
def api(controller: Proc) -> Iterator[httpx.Client]:
    assert controller.url
    with httpx.Client(
        base_url=controller.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    ) as c:
        yield c


def valid_spec(name: str = "ds", **kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "model": {"num_moe_layers": 4, "num_experts": 16, "expert_bytes": 4096},
        "slots_per_rank": 4,
        "min_dp": 4,
        "max_dp": 8,
    }
    spec.update(kw)
    return spec


def test_create_get_list_delete(api: httpx.Client) -> None:
    r = api.post("/v1/deployments", json=valid_spec("crud"))
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/deployments/crud"
    body = r.json()
    assert body["status"] == "pending" and body["generation"] == 0 and body["dp_size"] == 0
    assert api.get("/v1/deployments/crud").json()["spec"]["max_dp"] == 8
    assert "crud" in [d["name"] for d in api.get("/v1/deployments").json()["items"]]
    assert api.delete("/v1/deployments/crud").status_code == 200
    assert api.get("/v1/deployments/crud").status_code == 404


def test_a_deleted_deployment_leaves_no_layout_gauges(api: httpx.Client) -> None:
    assert api.post("/v1/deployments", json=valid_spec("gauged")).status_code == 201
    series = 'eep_layout_generation{deployment="gauged"}'
    wait_for(lambda: series in api.get("/metrics").text, 10, what="the generation gauge")
    assert api.delete("/v1/deployments/gauged").status_code == 200
    wait_for(lambda: series not in api.get("/metrics").text, 10, what="the gauge gone")
    assert 'eep_balancedness{deployment="gauged"}' not in api.get("/metrics").text


def test_duplicate_name_is_a_conflict(api: httpx.Client) -> None:
    assert api.post("/v1/deployments", json=valid_spec("dup")).status_code == 201
    r = api.post("/v1/deployments", json=valid_spec("dup", max_dp=6))
    assert r.status_code == 409
    assert r.headers["content-type"].startswith("application/problem+json")
    assert api.get("/v1/deployments/dup").json()["spec"]["max_dp"] == 8
    api.delete("/v1/deployments/dup")


def _huge() -> dict[str, Any]:
    return valid_spec("huge", labels={f"k{i}": "v" * 2000 for i in range(60)})


BAD_BODIES: list[tuple[str, Any, int, str]] = [
    (
        "wrong type for layers",
        valid_spec(model={"num_moe_layers": "many", "num_experts": 16, "expert_bytes": 1}),
        422,
        "num_moe_layers",
    ),
    (
        "zero experts",
        valid_spec(model={"num_moe_layers": 4, "num_experts": 0, "expert_bytes": 1}),
        422,
        "num_experts",
    ),
    (
        "negative expert bytes",
        valid_spec(model={"num_moe_layers": 4, "num_experts": 16, "expert_bytes": -5}),
        422,
        "expert_bytes",
    ),
    ("zero slots", valid_spec(slots_per_rank=0), 422, "slots_per_rank"),
    ("negative tp", valid_spec(tp=-1), 422, "tp"),
    ("zero pcp", valid_spec(pcp=0), 422, "pcp"),
    ("unknown top-level field", {**valid_spec(), "replicas": 3}, 422, "replicas"),
    (
        "unknown model field",
        valid_spec(model={"num_moe_layers": 4, "num_experts": 16, "expert_bytes": 1, "vocab": 9}),
        422,
        "vocab",
    ),
    ("missing model", {k: v for k, v in valid_spec().items() if k != "model"}, 422, "model"),
    ("bad name", valid_spec(name="Not_A_DNS_Label"), 422, "name"),
    ("min above max", valid_spec(min_dp=9, max_dp=8), 422, "greater than max_dp"),
    ("initial dp out of range", valid_spec(initial_dp=20), 422, "initial_dp"),
    (
        "cannot hold experts at max dp",
        valid_spec(slots_per_rank=1, min_dp=1, max_dp=8),
        422,
        "even at max_dp",
    ),
    (
        "tp x pcp too small an EP for min dp",
        valid_spec(slots_per_rank=2, min_dp=1, max_dp=8, tp=1, pcp=1),
        422,
        "min_dp",
    ),
    (
        "top_k above experts",
        valid_spec(model={"num_moe_layers": 4, "num_experts": 16, "expert_bytes": 1, "top_k": 17}),
        422,
        "top_k",
    ),
    ("vllm actuator without url", valid_spec(actuator="vllm"), 422, "vllm_url"),
    (
        "vllm actuator (not available yet)",
        valid_spec(actuator="vllm", vllm_url="http://127.0.0.1:1"),
        422,
        "not available",
    ),
    ("unknown actuator", valid_spec(actuator="kubernetes"), 422, "actuator"),
    ("dp above the hard cap", valid_spec(max_dp=100000), 422, "max_dp"),
    ("body is a list", [valid_spec()], 400, ""),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "mentions"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES]
)
def test_bad_spec_gets_a_problem_and_changes_nothing(
    api: httpx.Client,
    etcd_server: Any,
    module_prefix: str,
    case: str,
    body: Any,
    status: int,
    mentions: str,
) -> None:
    before = dump_sync(etcd_server.endpoint, module_prefix)
    r = api.post("/v1/deployments", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert {"type", "title", "status", "detail"} <= problem.keys()
    assert problem["status"] == status
    assert mentions in r.text
    assert dump_sync(etcd_server.endpoint, module_prefix) == before


def test_malformed_json_is_400_and_changes_nothing(
    api: httpx.Client, etcd_server: Any, module_prefix: str
) -> None:
    before = dump_sync(etcd_server.endpoint, module_prefix)
    r = api.post(
        "/v1/deployments", content=b'{"name": "x", ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["type"].endswith("/malformed")
    assert dump_sync(etcd_server.endpoint, module_prefix) == before


def test_huge_body_is_413_and_changes_nothing(
    api: httpx.Client, etcd_server: Any, module_prefix: str
) -> None:
    before = dump_sync(etcd_server.endpoint, module_prefix)
    r = api.post("/v1/deployments", json=_huge())
    assert r.status_code == 413
    assert r.json()["max_bytes"] == 65536
    assert dump_sync(etcd_server.endpoint, module_prefix) == before


def test_huge_chunked_body_is_413(api: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b" " * 4096

    r = api.post("/v1/deployments", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_missing_auth_is_401_and_changes_nothing(
    controller: Proc, etcd_server: Any, module_prefix: str
) -> None:
    before = dump_sync(etcd_server.endpoint, module_prefix)
    r = httpx.post(f"{controller.url}/v1/deployments", json=valid_spec("noauth"))
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.post(
        f"{controller.url}/v1/deployments",
        json=valid_spec("noauth"),
        headers={"Authorization": "Bearer wrong"},
    )
    assert r.status_code == 401
    assert dump_sync(etcd_server.endpoint, module_prefix) == before


def test_read_token_cannot_mutate(controller: Proc, etcd_server: Any, module_prefix: str) -> None:
    before = dump_sync(etcd_server.endpoint, module_prefix)
    headers = {"Authorization": f"Bearer {READER}"}
    r = httpx.post(f"{controller.url}/v1/deployments", json=valid_spec("ro"), headers=headers)
    assert r.status_code == 403
    assert r.json()["type"].endswith("/forbidden")
    assert (
        httpx.delete(f"{controller.url}/v1/deployments/anything", headers=headers).status_code
        == 403
    )
    assert httpx.get(f"{controller.url}/v1/deployments", headers=headers).status_code == 200
    assert dump_sync(etcd_server.endpoint, module_prefix) == before


def test_reads_are_open_without_a_token_by_default(controller: Proc) -> None:
    assert httpx.get(f"{controller.url}/v1/deployments").status_code == 200
    assert httpx.get(f"{controller.url}/v1/nodes").status_code == 200


def test_unknown_names_are_404_problems(
    api: httpx.Client, etcd_server: Any, module_prefix: str
) -> None:
    before = dump_sync(etcd_server.endpoint, module_prefix)
    for method, path in [
        ("GET", "/v1/deployments/nope"),
        ("DELETE", "/v1/deployments/nope"),
        ("GET", "/v1/nodes/nope"),
    ]:
        r = api.request(method, path)
        assert r.status_code == 404, (method, path)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "nope" in r.json()["detail"]
    assert dump_sync(etcd_server.endpoint, module_prefix) == before


def test_tokens_never_appear_in_logs(controller: Proc, api: httpx.Client) -> None:
    api.get("/v1/deployments")
    httpx.get(f"{controller.url}/v1/deployments", headers={"Authorization": f"Bearer {READER}"})
    assert ADMIN not in controller.output() and READER not in controller.output()


def test_openapi_and_health_endpoints(controller: Proc) -> None:
    paths = httpx.get(f"{controller.url}/openapi.json").json()["paths"]
    assert "/v1/deployments" in paths and "/v1/nodes/{node_id}" in paths
    assert httpx.get(f"{controller.url}/docs").status_code == 200
    assert httpx.get(f"{controller.url}/healthz").json()["status"] == "ok"
    # etcd's health shows in the metrics whether or not anything probes /readyz
    assert "eep_etcd_up 1.0" in httpx.get(f"{controller.url}/metrics").text
    ready = httpx.get(f"{controller.url}/readyz")
    assert ready.status_code == 200 and ready.json()["leader"]
    metrics = httpx.get(f"{controller.url}/metrics").text
    assert "eep_http_requests_total" in metrics and "eep_leader 1.0" in metrics


def test_eepctl_leader_shows_when_it_took_the_lead(controller: Proc) -> None:
    import subprocess
    import time

    from tests.support.processes import BIN

    ctl = [str(BIN / "eepctl"), "--server", str(controller.url), "--token", ADMIN]
    out = subprocess.run([*ctl, "leader"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    since = httpx.get(
        f"{controller.url}/v1/leader", headers={"Authorization": f"Bearer {ADMIN}"}
    ).json()["since"]
    # a local date and time, not seconds since the epoch
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) in out.stdout, out.stdout


def test_eepctl_layout_of_a_pending_deployment_says_it_has_no_rank(
    api: httpx.Client, controller: Proc
) -> None:
    import subprocess

    from tests.support.processes import BIN

    assert api.post("/v1/deployments", json=valid_spec("early")).status_code == 201
    try:
        # no agent: the bring-up waits, and the reconciler notes why
        wait_for(lambda: api.get("/v1/deployments/early").json().get("note"), 15, what="a note")
        out = subprocess.run(
            [str(BIN / "eepctl"), "--server", str(controller.url), "--token", READER,
             "layout", "early"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("early has no rank yet (generation 0): bring-up waits"), (
            out.stdout
        )
        assert "RANK" not in out.stdout  # no empty table
    finally:
        api.delete("/v1/deployments/early")


def test_openapi_documents_errors_as_problems(api: httpx.Client) -> None:
    doc = api.get("/openapi.json").json()
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}
    assert "HTTPValidationError" not in str(doc)  # FastAPI's own error shape is not ours
    ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    scale = doc["paths"]["/v1/deployments/{name}/scale"]["post"]["responses"]
    for code in ("400", "401", "403", "404", "409", "413", "422", "503"):
        assert scale[code]["content"] == {"application/problem+json": ref}, (code, scale[code])
    assert set(doc["paths"]["/v1/nodes"]["get"]["responses"]) == {"200", "401", "403", "422", "503"}
    # and a real error has the documented shape and media type
    bad = api.post("/v1/deployments/nope/scale", json={"dp_size": "2"})
    assert bad.headers["content-type"] == "application/problem+json"
    assert set(problem["required"]) <= set(bad.json()), bad.json()
