"""The cluster manifests in cluster/ checked against real schemas, offline and in about a second.

What validates against what:
- cluster/ray-up.yaml: the JSON schema Ray itself ships (ray/autoscaler/ray-schema.json, draft 7),
  then Ray's own `prepare_config` + `validate_config` (head type exists, min/max workers add up,
  docker section), and each node_config against the EC2 RunInstances input shape from botocore's
  service model (what Ray's AWS provider passes node_config to).
- cluster/raycluster.yaml, cluster/rayjob.yaml: cluster/schemas/kuberay-ray.io-v1.schema.json, a
  HAND-WRITTEN focused schema of the KubeRay CRD fields (no PyPI package ships the KubeRay CRDs;
  see the $comment in that file), whose Kubernetes types ($ref PodTemplateSpec, ObjectMeta,
  ResourceRequirements, ...) resolve to the strict Kubernetes schema that kubernetes-validate
  ships, for the oldest and the newest Kubernetes version it knows. Every pod template is also
  validated on its own through kubernetes_validate.validate (kind PodTemplate, strict).
- Negative cases prove the validators bite (a misspelt field, a wrong type, a bad enum).
- Cross-file facts: image tags and rayVersion equal the `ray==` pin in pyproject.toml, the
  RayJob's cluster is the RayCluster's spec, every Secret reference is consistent, /dev/shm holds
  the object store, and no credential literal appears anywhere under cluster/.

Needs the PyPI packages kubernetes-validate and botocore (plus jsonschema, PyYAML, ray).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import botocore.session
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import ray.autoscaler
import yaml
from botocore.validate import ParamValidator
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv
from referencing import Registry, Resource

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAYCLUSTER = CLUSTER / "raycluster.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
RAY_UP = CLUSTER / "ray-up.yaml"
README = CLUSTER / "README.md"
KUBERAY_SCHEMA = CLUSTER / "schemas" / "kuberay-ray.io-v1.schema.json"

# The one Secret holding S3 credentials, and the one holding the Ray cluster token.
S3_SECRET = "semid-s3-credentials"
S3_REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION")
AUTH_SECRET = "semid-ray-auth"
RAY_IMAGE_REPO = "rayproject/ray"

K8S_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
# Oldest and newest Kubernetes schema bundled with kubernetes-validate: a manifest valid on both
# uses no field that was added late or removed.
K8S_VERSIONS = (
    kubernetes_validate.utils.all_versions()[0],
    kubernetes_validate.utils.all_versions()[-1],
)
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # IANA_SVC_NAME
QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
QUANTITY_FACTOR = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


# ----------------------------------------------------------------------------- loading helpers


def _load_yaml(path: Path) -> dict:
    with path.open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict), f"{path.name}: expected one YAML mapping"
    return doc


@functools.cache
def _manifests() -> dict[str, dict]:
    return {p.name: _load_yaml(p) for p in (RAYCLUSTER, RAYJOB)}


def _m(name: str) -> dict:
    return copy.deepcopy(_manifests()[name])


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@functools.cache
def _pyproject() -> dict:
    path = ROOT / "pyproject.toml"
    assert path.is_file(), "pyproject.toml is missing: the Ray pin is read from it"
    return tomllib.loads(path.read_text())


def _runtime_requirements() -> list[Requirement]:
    """What a GPU node needs besides the image: [project] dependencies + the gpu extra - Ray."""
    project = _pyproject()["project"]
    extras = project.get("optional-dependencies", {})
    assert "gpu" in extras, "pyproject has no `gpu` extra; cluster/ installs semid_dist[gpu]"
    reqs = [Requirement(d) for d in project["dependencies"] + extras["gpu"]]
    return [r for r in reqs if canonicalize_name(r.name) != "ray"]


def _ray_pin() -> str:
    """The exact Ray version pinned in [project] dependencies (e.g. ray[train,default]==2.60.0)."""
    reqs = [Requirement(d) for d in _pyproject()["project"]["dependencies"]]
    ray_reqs = [r for r in reqs if canonicalize_name(r.name) == "ray"]
    assert len(ray_reqs) == 1, f"expected one ray requirement in pyproject, got {ray_reqs}"
    specs = list(ray_reqs[0].specifier)
    assert len(specs) == 1 and specs[0].operator == "==", (
        f"Ray must be pinned exactly (==) in pyproject so images can match it: {ray_reqs[0]}"
    )
    return specs[0].version


def _pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, PodTemplateSpec) for the head, every worker group and a submitter template."""
    spec = _cluster_spec(doc)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group["template"]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def _ray_groups(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, group spec) for the head group and every worker group."""
    spec = _cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group


def _ray_container(group: dict) -> dict:
    # KubeRay runs Ray in the first container of each group's pod template.
    return group["template"]["spec"]["containers"][0]


def _to_bytes(quantity: Any) -> float:
    m = QUANTITY.fullmatch(str(quantity))
    assert m, f"not a Kubernetes quantity: {quantity!r}"
    return float(m.group(1)) * QUANTITY_FACTOR[m.group(2)]


# ----------------------------------------------------------------------------- KubeRay schema


@functools.cache
def _k8s_definitions(version: str) -> dict:
    path = (
        importlib.resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{version}-local-strict"
        / "_definitions.json"
    )
    defs = json.loads(path.read_text())
    assert defs["$id"] == K8S_DEFINITIONS_ID, defs["$id"]
    return defs


@functools.cache
def _kuberay_schema() -> dict:
    return json.loads(KUBERAY_SCHEMA.read_text())


def _kuberay_validator(kind: str, k8s_version: str) -> jsonschema.Draft202012Validator:
    schema = _kuberay_schema()
    registry = Registry().with_resources(
        [
            (schema["$id"], Resource.from_contents(schema)),
            (K8S_DEFINITIONS_ID, Resource.from_contents(_k8s_definitions(k8s_version))),
        ]
    )
    root = {"$schema": schema["$schema"], "$ref": f"{schema['$id']}#/$defs/{kind}"}
    return jsonschema.Draft202012Validator(root, registry=registry)


def _errors(validator: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


def test_kuberay_schema_is_a_valid_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(_kuberay_schema())
    assert "HAND-WRITTEN" in _kuberay_schema()["$comment"]


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("name", [RAYCLUSTER.name, RAYJOB.name])
def test_kuberay_manifest_matches_crd_schema(name, k8s_version):
    doc = _m(name)
    errors = _errors(_kuberay_validator(doc["kind"], k8s_version), doc)
    assert not errors, f"{name} vs KubeRay/Kubernetes {k8s_version} schema:\n" + "\n".join(errors)


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("name", [RAYCLUSTER.name, RAYJOB.name])
def test_pod_templates_match_kubernetes_podtemplate(name, k8s_version):
    for where, template in _pod_templates(_m(name)):
        obj = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "check"},
            "template": template,
        }
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} {where}: {'/'.join(map(str, e.path))}: {e.message}")


def _break_worker_field(doc):
    group = _cluster_spec(doc)["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")


def _break_resources_type(doc):
    _ray_container(_cluster_spec(doc)["headGroupSpec"])["resources"] = ["cpu", "8"]


def _break_container_field(doc):
    _ray_container(_cluster_spec(doc)["headGroupSpec"])["imagePullPolicyy"] = "Always"


def _break_secret_ref(doc):
    env = _ray_container(_cluster_spec(doc)["workerGroupSpecs"][0])["env"]
    del env[0]["valueFrom"]["secretKeyRef"]["key"]


def _break_ray_start_param_type(doc):
    _cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _break_auth_mode(doc):
    _cluster_spec(doc)["authOptions"]["mode"] = "on"


def _break_shm_volume(doc):
    volume = _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["volumes"][0]
    volume["emptyDir"]["sizeLimit"] = {"value": "9Gi"}


def _break_submission_mode(doc):
    doc["spec"]["submissionMode"] = "K8sJob"


# (manifest, breakage, text the resulting error must contain): each proves one layer bites.
BREAKAGES = [
    (RAYCLUSTER.name, _break_worker_field, "'minReplica' was unexpected"),  # KubeRay schema
    (RAYCLUSTER.name, _break_auth_mode, "'on' is not one of"),
    (RAYCLUSTER.name, _break_ray_start_param_type, "rayStartParams/num-cpus"),
    (RAYCLUSTER.name, _break_resources_type, "containers/0/resources"),  # Kubernetes schema
    (RAYCLUSTER.name, _break_container_field, "'imagePullPolicyy' was unexpected"),
    (RAYCLUSTER.name, _break_secret_ref, "'key' is a required property"),
    (RAYCLUSTER.name, _break_shm_volume, "emptyDir/sizeLimit"),
    (RAYJOB.name, _break_submission_mode, "'K8sJob' is not one of"),
    (RAYJOB.name, _break_container_field, "'imagePullPolicyy' was unexpected"),
]


@pytest.mark.parametrize(
    "name, breakage, expected",
    BREAKAGES,
    ids=[f"{n.split('.')[0]}-{b.__name__[7:]}" for n, b, _ in BREAKAGES],
)
def test_kuberay_schema_rejects_broken_manifests(name, breakage, expected):
    doc = _m(name)
    breakage(doc)
    errors = _errors(_kuberay_validator(doc["kind"], K8S_VERSIONS[-1]), doc)
    assert any(expected in e for e in errors), errors


# ----------------------------------------------------------------------------- ray up schema


@functools.cache
def _ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def test_ray_up_matches_rays_own_schema():
    validator = jsonschema.Draft7Validator(_ray_schema())
    validator.check_schema(_ray_schema())
    errors = _errors(validator, _load_yaml(RAY_UP))
    assert not errors, "ray-up.yaml vs ray-schema.json:\n" + "\n".join(errors)


def test_ray_up_passes_rays_config_checks():
    # What `ray up` itself runs before touching AWS: defaults merged, then validated.
    validate_config(prepare_config(_load_yaml(RAY_UP)))


@functools.cache
def _run_instances():
    """EC2 RunInstances from botocore's bundled service model (no network)."""
    ec2 = botocore.session.get_session().get_service_model("ec2")
    return ec2.operation_model("RunInstances")


def _ec2_report(node_config: dict) -> str:
    # Ray's AWS provider passes node_config to RunInstances, adding the instance counts.
    params = dict(node_config, MinCount=1, MaxCount=1)
    return ParamValidator().validate(params, _run_instances().input_shape).generate_report()


def test_ray_up_node_configs_match_ec2_run_instances():
    operation = _run_instances()
    instance_types = set(operation.input_shape.members["InstanceType"].enum)
    for name, node_type in _load_yaml(RAY_UP)["available_node_types"].items():
        node_config = node_type["node_config"]
        report = _ec2_report(node_config)
        assert not report, f"{name}: {report}"
        assert node_config["InstanceType"] in instance_types, node_config["InstanceType"]


def _break_node_field(c):
    c["available_node_types"]["ray.worker.gpu"]["min_worker"] = 0


def _break_resource_type(c):
    c["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = "1"


def _break_docker_field(c):
    c["docker"]["imag"] = c["docker"]["image"]


def _break_commands_type(c):
    c["setup_commands"] = "pip install ."


RAY_UP_BREAKAGES = [
    (_break_node_field, "'min_worker' was unexpected"),
    (_break_resource_type, "'1' is not of type 'integer'"),
    (_break_docker_field, "'imag' was unexpected"),
    (_break_commands_type, "is not of type 'array'"),
]


@pytest.mark.parametrize(
    "breakage, expected", RAY_UP_BREAKAGES, ids=[b.__name__[7:] for b, _ in RAY_UP_BREAKAGES]
)
def test_ray_schema_rejects_broken_ray_up(breakage, expected):
    config = _load_yaml(RAY_UP)
    breakage(config)
    errors = _errors(jsonschema.Draft7Validator(_ray_schema()), config)
    assert any(expected in e for e in errors), errors


def test_ec2_shape_rejects_broken_node_config():
    node_types = _load_yaml(RAY_UP)["available_node_types"]
    node_config = dict(node_types["ray.worker.gpu"]["node_config"])
    node_config["InstanceTyp"] = node_config.pop("InstanceType")
    node_config["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] = "200"
    report = _ec2_report(node_config)
    assert 'Unknown parameter in input: "InstanceTyp"' in report
    assert "Invalid type for parameter BlockDeviceMappings[0].Ebs.VolumeSize" in report


def test_ray_up_shape():
    config = _load_yaml(RAY_UP)
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    workers = {k: v for k, v in node_types.items() if k != config["head_node_type"]}
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    assert workers, "no worker node type"
    for name, worker in workers.items():
        assert worker["resources"].get("GPU") == 1, f"{name}: one GPU per worker node"
        assert 0 <= worker.get("min_workers", 0) < worker["max_workers"] <= config["max_workers"]
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "--num-cpus=0" in head_start
    for commands in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token ray start" in commands
    # The token travels as a file from the operator's home, and the package source is mounted
    # where setup_commands install it from.
    mounts = config["file_mounts"]
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    package_mount = next(remote for remote, local in mounts.items() if local == ".")
    package = package_mount.replace("~", "$HOME", 1) + "[gpu]"
    assert any(cmd.startswith("pip install") and f'"{package}"' in cmd for cmd in config["setup_commands"]), (
        config["setup_commands"]
    )
    assert "gpu" in _pyproject()["project"].get("optional-dependencies", {})


# ----------------------------------------------------------------------------- cross-file facts


def _images() -> list[tuple[str, str]]:
    images = []
    for name in (RAYCLUSTER.name, RAYJOB.name):
        for where, template in _pod_templates(_m(name)):
            for container in template["spec"]["containers"]:
                images.append((f"{name} {where} {container['name']}", container["image"]))
    config = _load_yaml(RAY_UP)
    for key in ("image", "head_image", "worker_image"):
        if key in config["docker"]:
            images.append((f"{RAY_UP.name} docker.{key}", config["docker"][key]))
    for name, node_type in config["available_node_types"].items():
        if "worker_image" in node_type.get("docker", {}):
            images.append((f"{RAY_UP.name} {name}", node_type["docker"]["worker_image"]))
    return images


def test_ray_versions_match_pyproject_pin():
    pin = _ray_pin()
    for name in (RAYCLUSTER.name, RAYJOB.name):
        assert _cluster_spec(_m(name))["rayVersion"] == pin, f"{name}: rayVersion != ray=={pin}"
    images = _images()
    assert len(images) >= 5
    requires_python = _pyproject()["project"].get("requires-python")
    for where, image in images:
        repo, _, tag = image.partition(":")
        assert repo == RAY_IMAGE_REPO, f"{where}: {image} is not the official Ray image"
        assert tag == pin or tag.startswith(f"{pin}-"), f"{where}: {image} is not Ray {pin}"
        py = re.search(r"-py(\d)(\d+)\b", tag)
        if py and requires_python:
            version = f"{py.group(1)}.{py.group(2)}"
            assert version in SpecifierSet(requires_python), (
                f"{where}: image Python {version} outside requires-python {requires_python}"
            )
    assert len({image for _, image in images}) == 1, f"images differ: {images}"


def test_rayjob_runs_the_raycluster_spec():
    assert _m(RAYJOB.name)["spec"]["rayClusterSpec"] == _m(RAYCLUSTER.name)["spec"]


@pytest.mark.parametrize("name", [RAYCLUSTER.name, RAYJOB.name])
def test_gpu_workers_autoscale(name):
    spec = _cluster_spec(_m(name))
    assert spec["enableInTreeAutoscaling"] is True
    head = _ray_container(spec["headGroupSpec"])
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        resources = _ray_container(group)["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) == 1, group["groupName"]
        assert resources.get("requests", {}).get("nvidia.com/gpu", 1) == resources["limits"]["nvidia.com/gpu"]
        lo, n, hi = group["minReplicas"], group.get("replicas", 0), group["maxReplicas"]
        assert 0 <= lo <= n <= hi and lo < hi, f"{group['groupName']}: replicas {lo}/{n}/{hi}"


@pytest.mark.parametrize("name", [RAYCLUSTER.name, RAYJOB.name])
def test_names_are_valid_kubernetes_names(name):
    # Checked by the API server, not by the OpenAPI schema.
    for where, template in _pod_templates(_m(name)):
        spec = template["spec"]
        for volume in spec.get("volumes", []):
            assert DNS_LABEL.fullmatch(volume["name"]), f"{where}: volume {volume['name']}"
        for container in spec["containers"]:
            assert DNS_LABEL.fullmatch(container["name"]), f"{where}: {container['name']}"
            for port in container.get("ports", []):
                assert len(port["name"]) <= 15 and PORT_NAME.fullmatch(port["name"]), port


@pytest.mark.parametrize("name", [RAYCLUSTER.name, RAYJOB.name])
def test_dev_shm_holds_the_object_store(name):
    for where, group in _ray_groups(_m(name)):
        store = int(group["rayStartParams"]["object-store-memory"])
        pod = group["template"]["spec"]
        container = _ray_container(group)
        mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert len(mounts) == 1, f"{where}: /dev/shm is not mounted"
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
        assert volume["emptyDir"]["medium"] == "Memory", f"{where}: /dev/shm must be tmpfs"
        shm = _to_bytes(volume["emptyDir"]["sizeLimit"])
        memory = _to_bytes(container["resources"]["limits"]["memory"])
        # tmpfs pages are charged to the container, so the limit must hold shm and more.
        assert store <= shm < memory, f"{where}: store {store} / shm {shm} / memory {memory}"


def _env_entries(doc: dict) -> Iterator[tuple[str, dict]]:
    for where, template in _pod_templates(doc):
        for container in template["spec"].get("containers", []) + template["spec"].get("initContainers", []):
            for env in container.get("env", []):
                yield f"{where} {container['name']}", env
    for env in _cluster_spec(doc).get("autoscalerOptions", {}).get("env", []):
        yield "autoscaler", env


@pytest.mark.parametrize("name", [RAYCLUSTER.name, RAYJOB.name])
def test_s3_credentials_come_from_the_one_secret(name):
    doc = _m(name)
    for where, env in _env_entries(doc):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        assert ref["name"] == S3_SECRET, f"{where}: {env['name']} reads Secret {ref['name']}"
        assert ref["key"] == env["name"], f"{where}: {env['name']} reads key {ref['key']}"
        assert ref["key"] in S3_REQUIRED_KEYS + S3_OPTIONAL_KEYS, f"{where}: {ref['key']}"
        assert ref.get("optional", False) is (ref["key"] in S3_OPTIONAL_KEYS), f"{where}: {ref}"
    for where, group in _ray_groups(doc):
        names = {e["name"]: e for e in _ray_container(group).get("env", [])}
        for key in S3_REQUIRED_KEYS + S3_OPTIONAL_KEYS:
            assert key in names and "value" not in names[key], f"{where}: {key} not from Secret"
    assert _cluster_spec(doc)["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}


def test_readme_commands_match_the_manifests():
    text = README.read_text()
    for needle in [
        f"kubectl create secret generic {S3_SECRET}",
        f"kubectl create secret generic {AUTH_SECRET}",
        "--from-file=auth_token=",
        f"kubectl apply -f cluster/{RAYCLUSTER.name}",
        f"kubectl apply -f cluster/{RAYJOB.name}",
        "kubectl port-forward",
        "RAY_AUTH_MODE=token",
        "ray get-auth-token --generate",
        "--working-dir . --runtime-env jobs/runtime_env.yaml",
        "-- python -m jobs.train",
        f"ray up cluster/{RAY_UP.name}",
        f"ray dashboard cluster/{RAY_UP.name}",
        f"ray down cluster/{RAY_UP.name}",
    ]:
        assert needle in text, f"README.md lacks {needle!r}"
    for key in S3_REQUIRED_KEYS + S3_OPTIONAL_KEYS:
        assert f"--from-literal={key}=" in text, f"README.md: Secret key {key} not created"
    # Secret values on command lines come from the operator's environment, never literals.
    for m in re.finditer(r"--from-literal=([A-Za-z_]+)=(\S+)", text):
        assert m.group(2).startswith(('"$', "$")), f"README.md: literal secret {m.group(0)}"


# Shapes of real credentials; any hit under cluster/ is a leak.
CREDENTIAL_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}\b"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{16,}"),
    re.compile(r"(?i)\b(?:RAY_AUTH_TOKEN|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN)=(?![\"']?\$)\S+"),
]
SECRET_NAME = re.compile(r"(?i)(secret|password|token|access_key|session)")


@pytest.mark.parametrize(
    "text, leak",
    [
        ("AKIA" + "Q3EXAMPLEQ3EXAMP", True),
        ("aws_secret_access_key = " + "a1/B" * 10, True),
        ("-----BEGIN RSA " + "PRIVATE KEY-----", True),
        ("Authorization: Bearer " + "t0k3n" * 5, True),
        ("RAY_AUTH_TOKEN=" + "s3cr3t", True),
        ('RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"', False),
        ('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"', False),
        ("Authorization: Bearer <token>", False),
    ],
)
def test_credential_patterns_catch_leaks(text, leak):
    assert any(p.search(text) for p in CREDENTIAL_PATTERNS) is leak


def test_no_credential_literals_under_cluster():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert {RAYCLUSTER, RAYJOB, RAY_UP, README, KUBERAY_SCHEMA} <= set(files)
    for path in files:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            m = pattern.search(text)
            assert m is None, f"{path.relative_to(ROOT)}: credential-like text {m.group(0)!r}"
    for name in (RAYCLUSTER.name, RAYJOB.name):
        for where, env in _env_entries(_m(name)):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env, f"{name} {where}: {env['name']} has a literal value"


def test_rayjob_runtime_env_and_entrypoint():
    spec = _m(RAYJOB.name)["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "pip", "env_vars", "excludes", "py_modules"}
    RuntimeEnv(**runtime_env)  # Ray's own parser: URI kinds, pip fields, env var types
    working_dir = runtime_env["working_dir"]
    assert working_dir.startswith("s3://") and working_dir.endswith(".zip"), working_dir
    env_vars = runtime_env.get("env_vars", {})
    assert not any(SECRET_NAME.search(k) for k in env_vars), "secrets in runtime_env"

    # pip == pyproject's dependencies + the gpu extra, minus Ray (the image has the pinned one).
    wanted = {canonicalize_name(r.name): r for r in _runtime_requirements()}
    got = {canonicalize_name(r.name): r for r in map(Requirement, runtime_env["pip"]["packages"])}
    assert "ray" not in got, "the image provides Ray; reinstalling it could change the version"
    assert sorted(got) == sorted(wanted), "runtimeEnvYAML pip names differ from pyproject"
    for name, req in got.items():
        assert req.specifier == wanted[name].specifier, f"{req} != pyproject {wanted[name]}"
        assert req.extras == wanted[name].extras, f"{req} != pyproject {wanted[name]}"

    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train"], argv
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags["--mode"] == "kmeans"
    assert flags["--data_path"].startswith("s3://") and flags["--output_dir"].startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True


def test_entrypoints_named_by_the_manifests_exist():
    # cluster/ runs `python -m jobs.train` with jobs/runtime_env.yaml (README): both must exist.
    train = ROOT / "jobs" / "train.py"
    assert train.is_file() or (ROOT / "jobs" / "train" / "__main__.py").is_file(), train
    runtime_env = _load_yaml(ROOT / "jobs" / "runtime_env.yaml")
    pip = runtime_env.get("pip") or []
    packages = pip.get("packages", []) if isinstance(pip, dict) else pip
    assert isinstance(packages, list), "expected pip as a list or {packages: [...]}"
    RuntimeEnv(**runtime_env)
    names = {canonicalize_name(Requirement(p).name) for p in packages}
    assert "ray" not in names, "jobs/runtime_env.yaml must not reinstall Ray over the pinned one"
