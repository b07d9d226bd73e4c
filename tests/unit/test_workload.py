"""The pure workload builders: Deployment/Service manifests, owned args, block-aware replicas."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpupool import names
from gpupool.blocks import Block
from gpupool.models import DEFAULT_VLLM_IMAGE, parse_pool_spec
from gpupool.workload import (
    OWNED_ARGS,
    SPEC_HASH_ANNOTATION,
    build_deployment,
    build_service,
    check_env,
    check_extra_args,
    desired_replicas,
    next_scaling_change,
    spec_hash,
    startup_failure_threshold,
)

UID = "5c1f0d3e-0000-4000-8000-000000000001"
OWNER = {
    "apiVersion": "gpupool.dev/v1alpha1",
    "kind": "Pool",
    "name": "llama",
    "uid": UID,
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {
    "app.kubernetes.io/managed-by": "gpupool",
    "gpupool.dev/pool": "llama",
    "app.kubernetes.io/component": "vllm",
}


def pool(**runtime: Any) -> Any:
    return parse_pool_spec({
        "model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
        "seats": 4,
        "blocks": {"europe": {"price": "39.00"}, "americas": {"price": "29.00"},
                   "asia": {"price": "19.00"}},
        "runtime": runtime,
    })


def health(period: int, threshold: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": threshold}


def test_deployment_of_a_small_spec() -> None:
    got = build_deployment("llama", "models", UID, pool(), 2, "llama-upstream-key")

    template: dict[str, Any] = {
        "metadata": {"labels": LABELS},
        "spec": {
            "containers": [{
                "name": "vllm",
                "image": DEFAULT_VLLM_IMAGE,
                "args": [
                    "--model", "meta-llama/Llama-3.1-8B-Instruct",
                    "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct",
                    "--tensor-parallel-size", "1",
                    "--port", "8000",
                    "--host", "0.0.0.0",
                    "--enable-force-include-usage",
                ],
                "env": [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {
                    "name": "llama-upstream-key", "key": "apiKey"}}}],
                "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                "resources": {"requests": {"nvidia.com/gpu": "1"},
                              "limits": {"nvidia.com/gpu": "1"}},
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                "startupProbe": health(10, 180),
                "readinessProbe": health(5, 3),
                "livenessProbe": health(15, 4),
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }],
            "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
            "enableServiceLinks": False,
        },
    }
    digest = spec_hash(template)
    template["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: digest}
    assert got == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "llama-vllm",
            "namespace": "models",
            "labels": LABELS,
            "annotations": {SPEC_HASH_ANNOTATION: digest},
            "ownerReferences": [OWNER],
        },
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": LABELS},
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": 2400,
            "template": template,
        },
    }
    assert len(digest) == 16 and int(digest, 16) >= 0


def test_service_of_a_small_spec() -> None:
    assert build_service("llama", "models", UID, pool(port=8080)) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "llama-vllm",
            "namespace": "models",
            "labels": LABELS,
            "ownerReferences": [OWNER],
        },
        "spec": {
            "type": "ClusterIP",
            "selector": LABELS,
            "ports": [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def test_service_selects_the_deployments_pods_and_names_follow_the_contract() -> None:
    long = "a-very-long-pool-name-that-goes-on-and-on-and-on-beyond-the-limit"
    dep = build_deployment(long, "ns", UID, pool(), 1, "k")
    svc = build_service(long, "ns", UID, pool())
    assert dep["metadata"]["name"] == names.deployment_name(long)
    assert svc["metadata"]["name"] == names.service_name(long)
    assert len(dep["metadata"]["name"]) <= 63
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def container(dep: dict[str, Any]) -> dict[str, Any]:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def test_full_runtime_renders_every_option() -> None:
    spec = pool(
        image="registry.local/vllm:custom",
        gpusPerReplica=4,
        gpuResourceName="amd.com/gpu",
        port=9000,
        extraArgs=["--max-model-len", "8192", "--enable-prefix-caching"],
        env=[{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
             {"name": "VLLM_API_KEY", "value": "smuggled"},
             {"name": "HF_TOKEN", "value": "plain"}],
        hfTokenSecretRef={"name": "hf", "key": "token"},
        nodeSelector={"gpu": "mi300"},
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        priorityClassName="gpu-high",
        modelCache={"claimName": "hf-cache", "mountPath": "/models"},
        shmSize="32Gi",
        startupTimeoutSeconds=3605,
        resources={"requests": {"cpu": "8", "memory": "64Gi", "amd.com/gpu": "99"},
                   "limits": {"memory": "64Gi"}},
    )
    dep = build_deployment("llama", "models", UID, spec, 1, "llama-upstream-key")
    c = container(dep)
    pod = dep["spec"]["template"]["spec"]

    assert c["image"] == "registry.local/vllm:custom"
    assert c["args"] == [
        "--model", "meta-llama/Llama-3.1-8B-Instruct",
        "--served-model-name", "meta-llama/Llama-3.1-8B-Instruct",
        "--tensor-parallel-size", "4",
        "--port", "9000",
        "--host", "0.0.0.0",
        "--enable-force-include-usage",
        "--max-model-len", "8192", "--enable-prefix-caching",
    ]
    # Spec env first; operator-owned names from the spec are dropped; the key comes from the
    # upstream Secret, never as a literal value.
    assert c["env"] == [
        {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
        {"name": "HF_HOME", "value": "/models"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "llama-upstream-key", "key": "apiKey"}}},
    ]
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "amd.com/gpu": "4"},
        "limits": {"memory": "64Gi", "amd.com/gpu": "4"},
    }
    assert c["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"},
                                 {"name": "model-cache", "mountPath": "/models"}]
    assert pod["volumes"] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
        {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}},
    ]
    assert pod["nodeSelector"] == {"gpu": "mi300"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert pod["priorityClassName"] == "gpu-high"
    # 3605 s in 10 s periods, rounded up.
    assert c["startupProbe"]["failureThreshold"] == 361
    assert dep["spec"]["progressDeadlineSeconds"] == 3605 + 600
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}


def test_no_key_material_in_the_manifest() -> None:
    dep = build_deployment("llama", "models", UID, pool(), 1, "llama-upstream-key")
    c = container(dep)
    assert not any(a.startswith("--api-key") for a in c["args"])
    assert all("value" not in e for e in c["env"] if e["name"] == "VLLM_API_KEY")


def test_optional_fields_absent_when_unset() -> None:
    pod = build_deployment("llama", "models", UID, pool(), 1, "k")["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert key not in pod
    assert all(e["name"] not in ("HF_TOKEN", "HF_HOME") for e in pod["containers"][0]["env"])


def test_user_hf_home_wins_over_the_cache_default() -> None:
    spec = pool(modelCache={"claimName": "c"}, env=[{"name": "HF_HOME", "value": "/x"}])
    env = container(build_deployment("llama", "ns", UID, spec, 1, "k"))["env"]
    assert [e for e in env if e["name"] == "HF_HOME"] == [{"name": "HF_HOME", "value": "/x"}]
    mounts = container(build_deployment("llama", "ns", UID, spec, 1, "k"))["volumeMounts"]
    assert {"name": "model-cache", "mountPath": "/root/.cache/huggingface"} in mounts


def test_startup_threshold_rounds_up() -> None:
    assert startup_failure_threshold(pool(startupTimeoutSeconds=60)) == 6
    assert startup_failure_threshold(pool(startupTimeoutSeconds=61)) == 7


def test_spec_hash_follows_the_pod_template_not_the_replicas() -> None:
    def digest(spec: Any, replicas: int = 1) -> str:
        dep = build_deployment("llama", "ns", UID, spec, replicas, "k")
        assert dep["metadata"]["annotations"] == dep["spec"]["template"]["metadata"]["annotations"]
        return str(dep["metadata"]["annotations"][SPEC_HASH_ANNOTATION])

    base = digest(pool())
    assert digest(pool(), replicas=5) == base
    assert digest(pool()) == base
    assert digest(pool(image="vllm/vllm-openai:v0.12.0")) != base
    assert digest(pool(extraArgs=["--max-model-len", "4096"])) != base
    assert digest(pool(env=[{"name": "A", "value": "1"}])) != base
    assert digest(pool(gpusPerReplica=2)) != base
    # The Secret's name is part of the template; its content is not (Kubernetes reads it at start).
    other = build_deployment("llama", "ns", UID, pool(), 1, "other")
    assert other["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != base


def test_builders_do_not_alias_the_spec() -> None:
    spec = pool(env=[{"name": "A", "value": "1"},
                     {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}],
                nodeSelector={"a": "b"}, tolerations=[{"key": "k"}],
                affinity={"podAffinity": {"x": ["y"]}},
                resources={"requests": {"cpu": "1"}, "claims": [{"name": "c"}]})
    before = copy.deepcopy(spec.model_dump())
    dep = build_deployment("llama", "ns", UID, spec, 1, "k")
    c = container(dep)
    c["env"][0]["value"] = "changed"
    c["env"][1]["valueFrom"]["configMapKeyRef"]["name"] = "changed"
    c["resources"]["claims"][0]["name"] = "changed"
    dep["spec"]["template"]["spec"]["affinity"]["podAffinity"]["x"].append("z")
    c["resources"]["requests"]["cpu"] = "99"
    dep["spec"]["template"]["spec"]["nodeSelector"]["a"] = "z"
    dep["spec"]["template"]["spec"]["tolerations"][0]["key"] = "z"
    assert spec.model_dump() == before


def test_negative_replicas_refused() -> None:
    with pytest.raises(ValueError):
        build_deployment("llama", "ns", UID, pool(), -1, "k")


# --- owned args -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "found"),
    [
        ([], []),
        (["--max-model-len", "4096", "--enable-prefix-caching"], []),
        (["--model", "x"], ["--model"]),
        (["--model=x"], ["--model"]),
        (["--served-model-name", "a", "b"], ["--served-model-name"]),
        (["--served_model_name=a"], ["--served_model_name"]),
        (["--port", "1", "--host=::"], ["--port", "--host"]),
        (["--api-key", "k", "--api-key=k2"], ["--api-key"]),
        (["-tp", "2"], ["-tp"]),
        (["-tp=2"], ["-tp"]),
        (["--tensor-parallel-size=2", "--dtype", "half"], ["--tensor-parallel-size"]),
        (["--tensor_parallel_size", "2"], ["--tensor_parallel_size"]),
        # vLLM's parser takes unique abbreviations of long options.
        (["--served-model", "x", "--tensor-par=2", "--ho", "::"],
         ["--served-model", "--tensor-par", "--ho"]),
        (["--api_k", "k"], ["--api_k"]),
        # Longer options that start like an owned one are other options.
        (["--model-loader-extra-config", "{}", "--port-range", "--hosts"], []),
        (["--max-model-len", "4096", "--model-impl", "vllm", "--api-server-count", "2"], []),
        (["--max-model-len", "--model"], ["--model"]),
        (["-", "--", "value"], []),
    ],
)
def test_check_extra_args(args: list[str], found: list[str]) -> None:
    assert check_extra_args(args) == found


def test_owned_args_cover_the_rendered_flags() -> None:
    rendered = build_deployment("llama", "ns", UID, pool(), 1, "k")
    args = container(rendered)["args"]
    flags = {a for a in args if a.startswith("-")} - {"--enable-force-include-usage"}
    assert flags <= OWNED_ARGS
    assert check_extra_args(args) == ["--model", "--served-model-name",
                                      "--tensor-parallel-size", "--port", "--host"]


def test_check_env() -> None:
    assert check_env([{"name": "A"}, {"name": "VLLM_API_KEY", "value": "x"}]) == ["VLLM_API_KEY"]
    assert check_env([]) == []


# --- replicas by block ------------------------------------------------------------------------


def at(hms: str, day: int = 23) -> datetime:
    h, m, s = (int(x) for x in hms.split(":"))
    return datetime(2026, 11, day, h, m, s, tzinfo=UTC)


SOLD = {Block.ASIA: 0, Block.EUROPE: 5, Block.AMERICAS: 2}


def blockaware(**extra: Any) -> Any:
    return pool(seatsPerReplica=2, warmupSeconds=600, **extra)


@pytest.mark.parametrize("phase", ["draft", "funding", "paused", "", "unknown"])
def test_no_replicas_outside_running_phases(phase: str) -> None:
    assert desired_replicas(pool(replicas=3), SOLD, at("10:00:00"), phase) == 0
    assert desired_replicas(blockaware(), SOLD, at("10:00:00"), phase) == 0


def test_fixed_replicas_without_seats_per_replica() -> None:
    for t in ("00:00:00", "07:55:00", "12:00:00", "23:59:59"):
        assert desired_replicas(pool(replicas=3), SOLD, at(t), "active") == 3
        assert desired_replicas(pool(replicas=3), SOLD, at(t), "activating") == 3
    assert desired_replicas(pool(replicas=0), SOLD, at("12:00:00"), "activating") == 0
    assert next_scaling_change(pool(replicas=3), SOLD, at("12:00:00")) is None


@pytest.mark.parametrize(
    ("hms", "want"),
    [
        ("00:00:00", 0),   # asia, unsold
        ("07:49:59", 0),   # just before europe's warm-up
        ("07:50:00", 3),   # warm-up for europe: ceil(5 / 2)
        ("07:59:59", 3),
        ("08:00:00", 3),   # europe
        ("15:50:00", 3),   # americas needs 1: europe's 3 still hold
        ("16:00:00", 1),   # drops at the boundary
        ("23:49:59", 1),
        ("23:50:00", 1),   # asia next, unsold: nothing to warm up
        ("23:59:59", 1),
    ],
)
def test_replicas_follow_the_block_with_warmup(hms: str, want: int) -> None:
    assert desired_replicas(blockaware(), SOLD, at(hms), "active") == want


def test_replicas_drop_to_zero_in_an_unsold_block_and_warm_up_across_midnight() -> None:
    sold = {Block.ASIA: 3, Block.EUROPE: 0, Block.AMERICAS: 1}
    spec = blockaware()
    assert desired_replicas(spec, sold, at("07:59:59"), "active") == 2
    assert desired_replicas(spec, sold, at("08:00:00"), "active") == 0
    assert desired_replicas(spec, sold, at("15:49:59"), "active") == 0
    assert desired_replicas(spec, sold, at("15:50:00"), "active") == 1
    assert desired_replicas(spec, sold, at("23:49:59"), "active") == 1
    assert desired_replicas(spec, sold, at("23:50:00"), "active") == 2   # asia warms up
    assert desired_replicas(spec, sold, at("00:00:00", day=24), "active") == 2


def test_activating_runs_at_least_one_replica() -> None:
    spec = blockaware()
    assert desired_replicas(spec, SOLD, at("03:00:00"), "activating") == 1
    assert desired_replicas(spec, SOLD, at("03:00:00"), "active") == 0
    assert desired_replicas(spec, SOLD, at("09:00:00"), "activating") == 3


def test_seat_counts_round_up_and_missing_blocks_are_unsold() -> None:
    spec = pool(seatsPerReplica=4, warmupSeconds=0)
    assert desired_replicas(spec, {Block.EUROPE: 4}, at("09:00:00"), "active") == 1
    assert desired_replicas(spec, {Block.EUROPE: 5}, at("09:00:00"), "active") == 2
    assert desired_replicas(spec, {Block.EUROPE: 5}, at("17:00:00"), "active") == 0
    assert desired_replicas(spec, {}, at("09:00:00"), "active") == 0


def test_zero_warmup_changes_exactly_at_the_boundary() -> None:
    spec = pool(seatsPerReplica=2, warmupSeconds=0)
    assert desired_replicas(spec, SOLD, at("07:59:59"), "active") == 0
    assert desired_replicas(spec, SOLD, at("08:00:00"), "active") == 3
    assert next_scaling_change(spec, SOLD, at("03:00:00")) == at("08:00:00")


def test_warmup_longer_than_a_block_looks_past_the_next_boundary() -> None:
    # 10 h: at 06:00 both europe (08:00) and americas (16:00) are within reach.
    spec = pool(seatsPerReplica=1, warmupSeconds=36000)
    sold = {Block.ASIA: 0, Block.EUROPE: 1, Block.AMERICAS: 4}
    assert desired_replicas(spec, sold, at("05:59:59"), "active") == 1
    assert desired_replicas(spec, sold, at("06:00:00"), "active") == 4


@pytest.mark.parametrize(
    ("hms", "day", "want"),
    [
        ("03:00:00", 23, at("07:50:00")),           # up for europe's warm-up
        ("07:50:00", 23, at("16:00:00")),           # europe's 3 hold until americas' 1
        ("12:00:00", 23, at("16:00:00")),
        ("16:00:00", 23, at("00:00:00", day=24)),   # americas' 1 hold until unsold asia
        ("23:55:00", 23, at("00:00:00", day=24)),   # across midnight
        ("00:00:00", 24, at("07:50:00", day=24)),
    ],
)
def test_next_scaling_change(hms: str, day: int, want: datetime) -> None:
    assert next_scaling_change(blockaware(), SOLD, at(hms, day)) == want


def test_next_scaling_change_matches_desired_replicas_minute_by_minute() -> None:
    spec = blockaware()
    sold = {Block.ASIA: 3, Block.EUROPE: 0, Block.AMERICAS: 7}
    t = at("00:00:00")
    end = t + timedelta(days=1)
    while t < end:
        nxt = next_scaling_change(spec, sold, t)
        assert nxt is not None and nxt > t
        now = desired_replicas(spec, sold, t, "active")
        assert desired_replicas(spec, sold, nxt, "active") != now
        assert desired_replicas(spec, sold, nxt - timedelta(seconds=1), "active") == now
        t += timedelta(minutes=7)


def test_next_scaling_change_none_when_demand_is_flat() -> None:
    flat = {Block.ASIA: 2, Block.EUROPE: 2, Block.AMERICAS: 2}
    assert next_scaling_change(blockaware(), flat, at("12:00:00")) is None
    assert next_scaling_change(blockaware(), {}, at("12:00:00")) is None


def test_string_keys_and_other_timezones_work() -> None:
    from zoneinfo import ZoneInfo

    sold = {"europe": 5}
    # 09:00 in New York in November is 14:00 UTC: europe.
    ny = datetime(2026, 11, 23, 9, 0, tzinfo=ZoneInfo("America/New_York"))
    assert desired_replicas(blockaware(), sold, ny, "active") == 3  # type: ignore[arg-type]
    nxt = next_scaling_change(blockaware(), sold, ny)  # type: ignore[arg-type]
    assert nxt == at("16:00:00")


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError):
        desired_replicas(blockaware(), SOLD, datetime(2026, 11, 23, 9), "active")
