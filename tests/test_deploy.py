"""The container image and the example deployments, without a container engine: hadolint passes the Dockerfile,
the Kubernetes manifests and compose.yaml pass their schemas, the files agree with each other (ports, user,
config path, stop timeouts), and the image's entrypoint runs outside a container as the image runs it: a
non-root user, the image's environment, code it cannot write, serving until SIGTERM drains it."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from processes import http, reserve_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
CONFIG = tomllib.loads((ROOT / "deploy" / "bidder.toml").read_text())
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def stages(dockerfile: str) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions (continuation lines joined), by stage name."""
    text = re.sub(r"\\\n\s*", "", re.sub(r"^\s*#.*\n", "", dockerfile, flags=re.M))
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "FROM":
            current = rest.split(" AS ")[-1].strip()
            out[current] = []
        if current is not None:
            out[current].append((instruction, rest.strip()))
    return out


RUNTIME = stages(DOCKERFILE)["runtime"]


def instruction(name: str) -> list[str]:
    return [rest for inst, rest in RUNTIME if inst == name]


def exec_form(text: str) -> list[str]:
    return json.loads(text[text.index("["):])


def resources() -> dict[str, dict]:
    return {doc["kind"]: doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text())}


def tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return str(path)


def test_hadolint_passes_the_dockerfile():
    done = subprocess.run([tool("hadolint"), "--failure-threshold", "style", "Dockerfile"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_kubernetes_manifests_pass_their_schema(path):
    import kubernetes_validate

    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_compose_passes_the_compose_spec():
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           "compose.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_runtime_stage_has_no_compiler_and_no_torch():
    build, runtime = stages(DOCKERFILE)["build"], RUNTIME
    assert any(i == "RUN" and "pip wheel" in rest for i, rest in build)  # the extensions are compiled there
    runs = " ".join(rest for i, rest in runtime if i == "RUN")
    assert not re.search(r"apt-get|gcc|g\+\+|build-essential|cython|torch|\[train|\[dev", runs, re.I), runs
    assert "--no-index" in runs  # only the wheels the build stage made: nothing compiled or fetched here
    assert runtime[0][1].split()[0].endswith("-slim-bookworm")


def test_the_image_runs_as_the_user_the_deployment_expects():
    (user,) = instruction("USER")
    uid, gid = map(int, user.split(":"))
    assert uid >= 1000 and gid >= 1000
    context = resources()["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsNonRoot"], context["runAsUser"], context["runAsGroup"]) == (True, uid, gid)


def test_health_check_stop_signal_and_entrypoint_agree_with_the_config_file():
    (copy,) = [rest for rest in instruction("COPY") if rest.startswith("deploy/bidder.toml")]
    config_path = copy.split()[-1]
    (entrypoint,) = instruction("ENTRYPOINT")
    assert exec_form(entrypoint) == ["bidder", "serve", "--config", config_path]
    (health,) = instruction("HEALTHCHECK")
    assert exec_form(health) == ["bidder", "ready", "--config", config_path]
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    exposed = {int(p) for rest in instruction("EXPOSE") for p in rest.split()}
    assert exposed == {CONFIG["port"], CONFIG["metrics-port"]}
    assert CONFIG["workers"] == "auto"


def seconds(text: str) -> float:
    return float(text.removesuffix("s"))


def test_stop_timeouts_leave_the_drain_its_time():
    drain = CONFIG["drain-timeout"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert seconds(compose["services"]["bidder"]["stop_grace_period"]) > drain
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain


def test_the_deployment_asks_for_whole_cores_and_probes_the_server():
    (container,) = resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests["cpu"] == limits["cpu"] and float(requests["cpu"]).is_integer()  # Guaranteed, whole cores
    assert requests["memory"] == limits["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": CONFIG["port"], "metrics": CONFIG["metrics-port"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (copy,) = [rest for rest in instruction("COPY") if rest.startswith("deploy/bidder.toml")]
    assert mounts["config"] == str(Path(copy.split()[-1]).parent)  # the ConfigMap replaces the image's file
    (secret,) = [e for e in container["env"] if "valueFrom" in e]
    assert secret["name"] == "BIDDER_NOTICE_KEYS"
    assert secret["valueFrom"]["secretKeyRef"]["name"] == resources()["Secret"]["metadata"]["name"]


def test_prometheus_scrapes_the_metrics_port_of_the_bidder_service():
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (static,) = job["static_configs"]
    assert static["targets"] == [f"bidder:{CONFIG['metrics-port']}"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert {"bidder", "redis", "prometheus"} <= set(compose["services"])
    assert any("prometheus.yml" in volume for volume in compose["services"]["prometheus"]["volumes"])


# --- the entrypoint, outside a container ----------------------------------------------------------------------

def image_env() -> dict[str, str]:
    env = {}
    for rest in instruction("ENV"):
        env.update(dict(word.split("=", 1) for word in shlex.split(rest)))
    return env


def as_image_user(command: list[str]) -> list[str]:
    uid, gid = instruction("USER")[0].split(":")
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *command]


def python_for_the_image_user(env: dict[str, str], cwd: Path) -> list[str]:
    """This interpreter, as the image's user can run it: the virtual environment's own, or (where that one lives
    in a directory the user cannot enter, such as root's home) the same Python version from the PATH with the
    environment's packages on its path. The command runs multiprocessing's spawn, as the supervisor does."""
    probe = ("import multiprocessing as m, sys, bidder.app, onnxruntime; c = m.get_context('spawn'); c.Event(); "
             "p = c.Process(target=print); p.start(); p.join(); sys.exit(p.exitcode)")
    candidates = [[sys.executable]]
    same_version = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/bin")
    if same_version:
        candidates.append([same_version])
    for candidate in candidates:
        run_env = env if candidate == [sys.executable] else {
            **env, "PYTHONPATH": os.pathsep.join([env["PYTHONPATH"], *site.getsitepackages()])}
        done = subprocess.run(as_image_user([*candidate, "-c", probe]), env=run_env, cwd=cwd, capture_output=True,
                              timeout=120)
        if done.returncode == 0:
            env.update(run_env)
            return candidate
    pytest.skip(f"no Python the image's user may run with this environment's packages ({sys.executable})")


@pytest.fixture
def workdir():
    """The image's WORKDIR, the one place its user may write besides /tmp: owned by that user, in a directory the
    user may enter (pytest's own temporary directories are root's alone). Skips without root (setpriv needs it)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running as the image's user needs root and setpriv (util-linux)")
    parent = Path(tempfile.mkdtemp(prefix="bidder-image-"))
    os.chmod(parent, 0o755)
    path = parent / "var-lib-bidder"
    path.mkdir()
    uid, gid = map(int, instruction("USER")[0].split(":"))
    os.chown(path, uid, gid)
    yield path
    shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.slow
def test_the_entrypoint_serves_as_a_non_root_user_and_drains_on_sigterm(workdir):
    env = {"PATH": os.environ["PATH"], "HOME": str(workdir), "PYTHONPATH": str(ROOT), **image_env()}
    python = python_for_the_image_user(env, workdir)
    cannot_write = subprocess.run(as_image_user([*python, "-c", "import os, sys; "
                                                 "sys.exit(os.access(sys.argv[1], os.W_OK))", str(ROOT / "bidder")]),
                                  env=env, cwd=workdir, timeout=60)
    assert cannot_write.returncode == 0, "the code directory must be read-only to the image's user"

    holders = [reserve_port(), reserve_port()]
    port, metrics_port = (h.getsockname()[1] for h in holders)
    for holder in holders:
        holder.close()
    (entrypoint,) = instruction("ENTRYPOINT")
    command = exec_form(entrypoint)
    assert command[0] == "bidder"
    config = ROOT / "deploy" / "bidder.toml"
    command = [*python, "-m", "bidder", *command[1:-1], str(config),
               "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port), "--no-pin"]
    health = [*python, "-m", "bidder", *exec_form(instruction("HEALTHCHECK")[0])[1:-1], str(config),
              "--port", str(port)]
    assert subprocess.run(as_image_user(health), env=env, cwd=workdir, capture_output=True,
                          timeout=60).returncode == 1  # nothing serves yet: unhealthy
    server = subprocess.Popen(as_image_user(command), env=env, cwd=workdir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = subprocess.run(as_image_user(health), env=env, cwd=workdir, capture_output=True, text=True,
                                  timeout=60)
            if done.returncode == 0:
                break
            assert server.poll() is None, server.stdout.read()
            time.sleep(1)
        assert done.returncode == 0, done.stderr
        status, body = http(metrics_port, "/metrics")
        assert status == 200 and b"bidder_workers_scraped" in body
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert server.returncode == 0, output
    lines = [json.loads(line) for line in output.splitlines()]  # the image logs JSON
    started = next(line for line in lines if line["event"] == "supervisor_started")
    assert started["pid"] == next(line["pid"] for line in lines if line["event"] == "supervisor_stopped")
    assert any(line["event"] == "drain_finished" for line in lines)
    assert not list(ROOT.glob("bidder/__pycache__/*.pyc.*"))  # nothing half-written into the code directory
