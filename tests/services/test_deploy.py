"""The deployment files agree with the code: every `ecif` command in Dockerfile,
docker-compose.yml and deploy/*.yaml parses with the real CLI parser, every ECIF_* variable is a
field of Settings, and the services are wired together (healthchecks, GPU, queues, store)."""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from services.cli import build_parser
from services.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_VARS = {"ECIF_" + name.upper() for name in Settings.model_fields}
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
K8S = [(f"deploy/{path.name}", doc) for path in sorted((ROOT / "deploy").glob("*.yaml"))
       for doc in yaml.safe_load_all(path.read_text()) if doc]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


# -- helpers ------------------------------------------------------------------------------------

def argv(command) -> list[str]:
    """A command as compose/k8s/Docker write it: a shell-like string or a list."""
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def parse(command: list[str], where: str):
    """The real `ecif` parser's reading of a command; a clear failure if it rejects it."""
    try:
        return build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(command)}` is rejected by services.cli.build_parser "
                    f"(unknown verb or flag; argparse's message is in the captured stderr)")


def compose_env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", "NAME"]
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def compose_mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes (short "src:target[:ro]" or long syntax)."""
    mounts = {}
    for spec in service.get("volumes", []):
        if isinstance(spec, str):
            source, target = re.match(r"(\$\{.*?\}|[^:]+):([^:]+)", spec).groups()
        else:
            source, target = spec.get("source"), spec["target"]
        mounts[target] = source
    return mounts


def named(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in K8S if doc["kind"] == kind}


def pod_spec(doc: dict) -> dict | None:
    return doc.get("spec", {}).get("template", {}).get("spec")  # Deployment, Job, ...


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc) or {}
    return spec.get("initContainers", []) + spec.get("containers", [])


def container_argv(container: dict) -> list[str]:
    return argv(container.get("command", [])) + argv(container.get("args", []))


def dockerfile_cmd() -> list[str]:
    line = re.search(r"^CMD\s+(.+)$", DOCKERFILE, re.MULTILINE).group(1)
    return json.loads(line) if line.startswith("[") else shlex.split(line)


def ecif_commands() -> list[tuple[str, list[str]]]:
    found = [(f"docker-compose.yml service {name}", argv(svc["command"]))
             for name, svc in SERVICES.items() if "command" in svc]
    found += [(f"{file} {doc['metadata']['name']}/{c['name']}", container_argv(c))
              for file, doc in K8S for c in containers(doc)]
    found.append(("Dockerfile CMD", dockerfile_cmd()))
    return [(where, command) for where, command in found if command[:1] == ["ecif"]]


def env_names() -> list[tuple[str, set[str]]]:
    """Every place that sets environment variables, with the names it sets."""
    places = [(f"docker-compose.yml service {name}", set(compose_env(svc))) for name, svc in SERVICES.items()]
    places += [(f"docker-compose.yml {key}", set(value) | set(compose_env(value)))
               for key, value in COMPOSE.items() if key.startswith("x-") and isinstance(value, dict)]
    for file, doc in K8S:
        if doc["kind"] in ("ConfigMap", "Secret"):
            places.append((file, set(doc.get("data") or {}) | set(doc.get("stringData") or {})))
        places += [(f"{file} {c['name']}", {e["name"] for e in c.get("env", [])}) for c in containers(doc)]
    return places


# -- commands and settings ----------------------------------------------------------------------

@pytest.mark.parametrize("where, command", ecif_commands(), ids=[where for where, _ in ecif_commands()])
def test_ecif_commands_parse(where, command):
    parse(command, where)


def test_every_ecif_variable_is_a_setting():
    unknown = {f"{where}: {name}" for where, names in env_names() for name in names
               if name.startswith("ECIF_") and name not in SETTINGS_VARS}
    assert not unknown, f"not fields of services.settings.Settings ({sorted(SETTINGS_VARS)}): {sorted(unknown)}"


def test_dockerfile_pins_torch_like_pyproject_and_runs_ecif():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = dict(dep.split("==") for dep in pyproject["project"]["dependencies"] if "==" in dep)
    for package in ("torch", "torchvision"):
        wanted = f"{package}=={pins[package]}"
        assert re.search(rf"pip install .*{re.escape(wanted)}(\s|$)", DOCKERFILE, re.MULTILINE), \
            f"Dockerfile must `pip install {wanted}` (the pin in pyproject.toml)"
    assert dockerfile_cmd()[:1] == ["ecif"], f"Dockerfile CMD should start with ecif: {dockerfile_cmd()}"


# -- docker compose -----------------------------------------------------------------------------

def test_compose_services_healthchecks_gpu_queues_and_store():
    missing = {"postgres", "redis", "migrate", "api", "worker-gpu", "worker-cpu"} - set(SERVICES)
    assert not missing, f"docker-compose.yml lacks services {sorted(missing)}"
    for name in ("postgres", "redis", "api"):
        assert "healthcheck" in SERVICES[name], f"compose service {name} has no healthcheck"

    devices = SERVICES["worker-gpu"].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), \
        f"worker-gpu must reserve an nvidia GPU under deploy.resources.reservations.devices, got {devices}"

    for name, queue in (("worker-gpu", "gpu"), ("worker-cpu", "cpu")):
        assert parse(argv(SERVICES[name]["command"]), name).queues == queue, f"compose {name} should serve --queues {queue}"



def test_compose_store_is_the_bucket_of_its_s3_service():
    """API and workers share no folder: the store is a bucket of the compose S3 service, which
    they reach through AWS_ENDPOINT_URL, and which exists before they start."""
    from urllib.parse import urlsplit

    for name in ("api", "worker-gpu", "worker-cpu"):
        env, mounts = compose_env(SERVICES[name]), compose_mounts(SERVICES[name])
        store = urlsplit(env.get("ECIF_STORE_URL", ""))
        assert store.scheme == "s3" and store.netloc, f"compose {name}: ECIF_STORE_URL should be s3://bucket/prefix"
        endpoint = urlsplit(env.get("AWS_ENDPOINT_URL", ""))
        assert endpoint.hostname in SERVICES and "healthcheck" in SERVICES[endpoint.hostname], \
            f"compose {name}: AWS_ENDPOINT_URL should name the compose S3 service (with a healthcheck): {endpoint}"
        assert env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"), f"compose {name}: S3 credentials"
        creators = [other for other, svc in SERVICES.items() if f"local/{store.netloc}" in " ".join(argv(svc.get(
            "command", [])))]
        assert creators and (SERVICES[name].get("depends_on") or {}).get(creators[0], {}).get("condition") == \
            "service_completed_successfully", f"compose {name}: start after the bucket {store.netloc} exists"
        assert not any(target.startswith("/var/lib/ecif") for target in mounts), f"compose {name}: a store folder"
        for root in env.get("ECIF_DATA_ROOTS", "").split(","):
            assert root in mounts or urlsplit(root).netloc == store.netloc, f"compose {name}: data root {root}"


# -- kubernetes ---------------------------------------------------------------------------------

def test_k8s_kinds_and_names():
    kinds = {doc["kind"] for _, doc in K8S}
    missing = {"Deployment", "Service", "ConfigMap", "Secret", "Job"} - kinds
    assert not missing, f"deploy/ lacks kinds {sorted(missing)}"
    assert {"ecif-api", "ecif-worker-gpu", "ecif-worker-cpu"} <= set(named("Deployment"))


def test_k8s_containers_read_config_and_secret():
    refs = {"configMapRef": set(named("ConfigMap")), "secretRef": set(named("Secret"))}
    for file, doc in K8S:
        for c in containers(doc):
            for ref, existing in refs.items():
                used = {source[ref]["name"] for source in c.get("envFrom", []) if ref in source}
                assert used and used <= existing, f"{file} {c['name']}: envFrom {ref} {used or 'missing'}, defined: {existing}"


def test_k8s_workers_queues_and_gpu():
    for name, queue in (("ecif-worker-gpu", "gpu"), ("ecif-worker-cpu", "cpu")):
        [worker] = containers(named("Deployment")[name])
        assert parse(container_argv(worker), name).queues == queue, f"{name} should serve --queues {queue}"
    [gpu] = containers(named("Deployment")["ecif-worker-gpu"])
    assert int(gpu.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1, \
        "ecif-worker-gpu must set resources.limits nvidia.com/gpu"


def test_k8s_api_probes_and_service():
    api = named("Deployment")["ecif-api"]
    [container] = containers(api)
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    resolve = lambda port: ports.get(port, port)  # noqa: E731 - a named port or a number
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        assert get.get("path") == path and resolve(get.get("port")) in ports.values(), \
            f"ecif-api {probe} should GET {path} on a container port {ports}, got {get}"

    labels = api["spec"]["template"]["metadata"]["labels"]
    [service] = named("Service").values()
    selector = service["spec"]["selector"]
    assert selector and selector.items() <= labels.items(), f"Service selector {selector} vs api pod labels {labels}"
    assert all(resolve(p.get("targetPort", p["port"])) in ports.values() for p in service["spec"]["ports"])


def test_k8s_store_is_a_bucket_with_credentials_in_the_secret():
    """No pod mounts a shared store: the audit folders are in a bucket, its keys in the Secret."""
    config = named("ConfigMap")["ecif-config"]["data"]
    assert config["ECIF_STORE_URL"].startswith("s3://"), config["ECIF_STORE_URL"]
    secret = named("Secret")["ecif-secrets"]["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret) and not \
        {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(config), "S3 keys belong in the Secret only"
    assert not named("PersistentVolumeClaim"), "no shared volume is needed"
    for name in ("ecif-api", "ecif-worker-gpu", "ecif-worker-cpu"):
        doc = named("Deployment")[name]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(doc).get("volumes", [])
                  if "persistentVolumeClaim" in v}
        assert claims <= {"ecif-data"}, f"{name} mounts {claims}"
